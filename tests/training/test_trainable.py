import pytest

from privdiff.models.tiny import TinySpec, tiny_unet
from privdiff.training.trainable import TRAINABLE_SETS, select_trainable, transformer_blocks
from privdiff.privacy.clipping import GradSampleClipper


@pytest.fixture()
def unet():
    return tiny_unet(TinySpec(), seed=0)


def test_sets_nest_and_name_the_right_parameters(unet):
    sizes = {}
    for name in TRAINABLE_SETS:
        chosen = select_trainable(unet=unet, trainable=name)
        sizes[name] = chosen.num_trainable
        trained = {n for n, p in unet.named_parameters() if p.requires_grad}
        assert trained == set(chosen.parameter_names)
        if name == "cross_attention":
            assert trained and all(".attn2.to_" in n for n in trained)
        if name == "attention":
            assert any(".attn1.to_q." in n for n in trained) and all(".attn" in n for n in trained)
        if name == "transformer":
            assert any(n.endswith("proj_in.weight") for n in trained) and any(".ff." in n for n in trained)
    assert sizes["cross_attention"] < sizes["attention"] < sizes["transformer"] < sizes["full"]
    assert select_trainable(unet=unet, trainable="full").fraction == 1.0


def test_ablation_keeps_later_blocks_only(unet):
    blocks = transformer_blocks(unet)
    assert blocks[0].startswith("down_blocks") and blocks[-1].startswith("up_blocks")
    chosen = select_trainable(unet=unet, trainable="attention", ablation_blocks=1)
    assert not any(n.startswith(blocks[0] + ".") for n in chosen.parameter_names)
    assert chosen.num_trainable < select_trainable(unet=unet, trainable="attention").num_trainable


@pytest.mark.parametrize("name", ["cross_attention", "attention", "transformer"])
def test_fast_clipping_covers_every_dp_ldm_set(unet, name):
    select_trainable(unet=unet, trainable=name)
    clipper = GradSampleClipper(module=unet, max_grad_norm=1.0)
    assert clipper.layers


def test_bad_choices_are_explained(unet):
    with pytest.raises(ValueError, match="not one of"):
        select_trainable(unet=unet, trainable="everything")
    with pytest.raises(ValueError, match="transformer blocks"):
        select_trainable(unet=unet, trainable="attention", ablation_blocks=99)
