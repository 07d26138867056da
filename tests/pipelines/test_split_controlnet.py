"""Split ControlNet, client side and the server's attacks: paper mode leaks the images exactly,
the hardened default does not, and every draw is fixed per (secret, image, noising)."""

import numpy as np
import pytest
import torch

from privdiff.pipelines.split_attacks import known_noise
from privdiff.pipelines.split_controlnet import SplitConfig, allowed_timesteps, client_payload, reconstruct_from_traffic
from privdiff.privacy.attacks import inverse_symsigmoid, invert_conv_in, symsigmoid
from privdiff.privacy.split_secret import ClientSecret

SECRET = ClientSecret(bytes(range(32)))
IDS = [SECRET.image_id(str(i).encode()) for i in range(8)]


@pytest.fixture(scope="module")
def tiny():
    from privdiff.models.privdiff_tiny import load_privdiff_tiny

    return load_privdiff_tiny()


@pytest.fixture(scope="module")
def batch():
    from privdiff.data import load_dataset

    data = load_dataset(data="circles", num_items=8)
    pixels = torch.stack([data[i]["pixel_values"] for i in range(8)])
    hints = torch.stack([data[i]["hint"] for i in range(8)]) * 2 - 1
    return pixels, hints


def test_symsigmoid_inverts_and_conv_in_inverts(tiny):
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert torch.allclose(inverse_symsigmoid(symsigmoid(x)), x, atol=1e-9)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny.unet.conv_in(z)
    assert torch.allclose(invert_conv_in(conv_in=tiny.unet.conv_in, output=out).float(), z, atol=1e-4)


def test_hardened_timesteps_respect_the_snr_bound(tiny):
    t = allowed_timesteps(scheduler=tiny.scheduler, config=SplitConfig())
    ab = tiny.scheduler.alphas_cumprod.double()[t]
    assert len(t) and (ab / (1 - ab) <= SplitConfig().snr_bound).all()
    with pytest.raises(ValueError, match="snr_bound"):
        allowed_timesteps(scheduler=tiny.scheduler, config=SplitConfig(snr_bound=1e-12))


def test_draws_are_fixed_per_image_and_noising_and_keyed_on_the_secret(tiny, batch):
    pixels, hints = batch
    config = SplitConfig(draws_per_image=None)
    first = client_payload(pipeline=tiny, pixels=pixels[:4], hint_pixels=hints[:4], image_ids=IDS[:4], epoch=5,
                           config=config, secret=SECRET)
    again = client_payload(pipeline=tiny, pixels=pixels[[2, 0]], hint_pixels=hints[[2, 0]], image_ids=[IDS[2], IDS[0]],
                           epoch=5, config=config, secret=SECRET)
    for name in first:
        assert np.array_equal(first[name][[2, 0]], again[name]), name  # a re-sent image shows nothing new
    later = client_payload(pipeline=tiny, pixels=pixels[:4], hint_pixels=hints[:4], image_ids=IDS[:4], epoch=6,
                           config=config, secret=SECRET)
    assert not np.array_equal(first["label"], later["label"])
    assert set(first) == {"z_t", "h", "t", "label"} and first["z_t"].dtype == np.float16
    other = client_payload(pipeline=tiny, pixels=pixels[:4], hint_pixels=hints[:4], image_ids=IDS[:4], epoch=5,
                           config=config, secret=ClientSecret(bytes(32)))
    assert not np.array_equal(first["label"], other["label"]), "another secret, other noise"


@pytest.mark.parametrize("draws", [1, 2])
def test_an_image_gets_only_draws_per_image_noisings_however_many_epochs(tiny, batch, draws):
    pixels, hints = batch
    config = SplitConfig(draws_per_image=draws)
    epochs = [client_payload(pipeline=tiny, pixels=pixels[:2], hint_pixels=hints[:2], image_ids=IDS[:2], epoch=e,
                             config=config, secret=SECRET) for e in range(5)]
    distinct = {epoch["label"].tobytes() for epoch in epochs}
    assert len(distinct) == draws
    assert all(np.array_equal(epochs[e]["z_t"], epochs[e % draws]["z_t"]) for e in range(5))
    with pytest.raises(ValueError, match="draws_per_image"):
        SplitConfig(draws_per_image=0)


def test_ssim_is_one_for_equal_images_and_matches_the_closed_form_for_flat_ones():
    from privdiff.privacy.attacks import ssim

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(estimate=x, reference=x) == pytest.approx(1.0)
    assert ssim(estimate=x, reference=x.flip(-1)) < 0.2
    # Flat images a and b: no variance, so SSIM = (2ab + C1) / (a² + b² + C1).
    a, b, c1 = 0.3, 0.7, 0.01 ** 2
    assert ssim(estimate=torch.full((1, 3, 16, 16), a), reference=torch.full((1, 3, 16, 16), b)) == pytest.approx(
        (2 * a * b + c1) / (a * a + b * b + c1))
    with pytest.raises(ValueError, match="same shape"):
        ssim(estimate=x, reference=x[:1])


def _traffic(tiny, batch, config, epochs):
    pixels, hints = batch
    return [client_payload(pipeline=tiny, pixels=pixels, hint_pixels=hints, image_ids=IDS[:len(pixels)], epoch=e,
                           config=config, secret=SECRET) for e in range(epochs)]


def test_paper_mode_gives_the_images_away(tiny, batch):
    with pytest.warns(UserWarning, match="reconstruct"):
        traffic = _traffic(tiny, batch, SplitConfig(mode="paper"), epochs=1)
    assert "conv_in_z_t" in traffic[0] and "z_t" not in traffic[0]
    report = reconstruct_from_traffic(pipeline=tiny, payloads=traffic, pixels=batch[0], hint_pixels=batch[1])
    assert report.image_psnr >= 30, report
    assert report.hint_psnr >= 30, report


def test_hardened_default_keeps_images_and_hints_near_the_mean_guess_even_with_epochs_linked(tiny):
    from privdiff.data import load_dataset
    from privdiff.privacy.threat_model import SPLIT_DEFAULT_HINT_MARGIN_DB, SPLIT_DEFAULT_IMAGE_MARGIN_DB

    data = load_dataset(data="circles", num_items=24)  # the promise is stated for a set, not for a handful
    pixels = torch.stack([data[i]["pixel_values"] for i in range(24)])
    hints = torch.stack([data[i]["hint"] for i in range(24)]) * 2 - 1
    config = SplitConfig()
    ids = [SECRET.image_id(str(i).encode()) for i in range(24)]
    traffic = [client_payload(pipeline=tiny, pixels=pixels, hint_pixels=hints, image_ids=ids, epoch=e, config=config,
                              secret=SECRET) for e in range(10)]
    report = reconstruct_from_traffic(pipeline=tiny, payloads=traffic, pixels=pixels, hint_pixels=hints,
                                      optimisation_steps=20, **known_noise(config))
    assert set(report.attacks) >= {"linear", "denoiser", "hint-regions", "tv-inversion(1)"}
    # The best attack, over all ten epochs (one noising per image: epochs add nothing).
    assert report.image_psnr <= report.mean_image_psnr + SPLIT_DEFAULT_IMAGE_MARGIN_DB, report
    assert len(report.image_psnr_by_epochs) == 10
    # The default protects the hint too (sigma_hint > 0); at sigma_hint = 0 the server rebuilds it (below).
    assert report.hint_psnr <= report.hint_mean_psnr + SPLIT_DEFAULT_HINT_MARGIN_DB, report


def test_sigma_hint_hides_the_hint_from_the_server_and_without_it_the_hint_is_given_away(tiny, batch):
    def hint_margin(sigma_hint):
        config = SplitConfig(sigma_hint=sigma_hint)
        report = reconstruct_from_traffic(pipeline=tiny, payloads=_traffic(tiny, batch, config, epochs=3),
                                          pixels=batch[0], hint_pixels=batch[1], optimisation_steps=0,
                                          **known_noise(config))
        return report.hint_psnr - report.hint_mean_psnr

    assert hint_margin(0.0) >= 30
    assert hint_margin(1.0) <= 2


def test_fresh_noise_every_epoch_would_leak_which_is_why_the_default_reuses_one_draw(tiny, batch):
    # The attacks are strong enough to see a leak: ten fresh draws, linked, and the public UNet as a prior.
    config = SplitConfig(draws_per_image=None)
    report = reconstruct_from_traffic(pipeline=tiny, payloads=_traffic(tiny, batch, config, epochs=10),
                                      pixels=batch[0], hint_pixels=batch[1], sigma_label=config.sigma_label,
                                      optimisation_steps=0)
    assert report.image_psnr > report.mean_image_psnr + 2, report
    assert report.image_psnr_by_epochs[-1] > report.image_psnr_by_epochs[0]


@pytest.mark.parametrize("mode", ["hardened", "paper"])
def test_server_trains_the_controlnet_from_payloads_alone(tiny, batch, mode):
    import copy
    import warnings

    from privdiff.pipelines.split_controlnet import SplitTrainer

    unet = copy.deepcopy(tiny.unet)
    frozen = {k: v.clone() for k, v in unet.state_dict().items()}
    trainer = SplitTrainer(unet=unet, learning_rate=1e-3)
    before = {k: v.clone() for k, v in trainer.controlnet.state_dict().items()}
    pixels, hints = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = [trainer.train_on(client_payload(pipeline=tiny, pixels=pixels, hint_pixels=hints, image_ids=IDS,
                                                  epoch=s, config=SplitConfig(mode=mode), secret=SECRET))
                  for s in range(3)]
    assert all(np.isfinite(losses)) and trainer.steps == 3
    assert all(torch.equal(v, frozen[k]) for k, v in unet.state_dict().items())  # the UNet stays frozen
    changed = [k for k, v in trainer.controlnet.state_dict().items() if not torch.equal(v, before[k])]
    assert any("controlnet_down_blocks" in k for k in changed)  # the zero convolutions start to learn
    assert isinstance(unet.conv_in, torch.nn.Conv2d)  # paper mode's swap is undone


def test_saved_split_controlnet_reloads_and_generates_with_its_hint(tiny, batch, tmp_path):
    import json

    from diffusers import ControlNetModel

    from privdiff.pipelines.split_controlnet import (SPLIT_CONFIG_KEY, SplitTrainer, save_split_controlnet,
                                                     split_controlnet_pipeline)

    trainer = SplitTrainer(unet=tiny.unet)
    save_split_controlnet(controlnet=trainer.controlnet, out=tmp_path / "cn")
    assert json.loads((tmp_path / "cn" / "config.json").read_text())[SPLIT_CONFIG_KEY]["version"] == 1
    controlnet = ControlNetModel.from_pretrained(tmp_path / "cn")
    pipe = split_controlnet_pipeline(base=tiny, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    hints = [((h.permute(1, 2, 0).numpy() + 1) / 2) for h in batch[1][:2]]
    images = pipe(["a red circle on a blue background"] * 2, hints, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    # A fresh ControlNet's zero convolutions add nothing: the output equals the plain pipeline's.
    plain = tiny(["a red circle on a blue background"] * 2, num_inference_steps=4, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.allclose(images, plain, atol=1e-4)


def test_two_clients_train_one_job_over_curve_on_loopback_and_download_it(tiny, tmp_path):
    import copy
    import threading

    from privdiff.data import load_dataset
    from privdiff.pipelines.split_controlnet import SplitJob, SplitTrainer, download_controlnet, train_split_client
    from privdiff.privacy.split_secret import SentLedger
    from privdiff.transport.keys import create_keys
    from privdiff.transport.peer import SplitClient, SplitServer

    create_keys(folder=tmp_path / "server", name="server")
    allowed = tmp_path / "allowed"
    for name in ("a", "b"):
        create_keys(folder=tmp_path / name, name=name)
        allowed.mkdir(exist_ok=True)
        (allowed / f"{name}.key").write_bytes((tmp_path / name / f"{name}.key").read_bytes())
    job = SplitJob(trainer=SplitTrainer(unet=copy.deepcopy(tiny.unet), learning_rate=1e-4))
    server = SplitServer(bind="tcp://127.0.0.1:*", server_key=tmp_path / "server" / "server.key_secret",
                         allowed_clients=allowed, handler=job)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, kwargs={"should_stop": stop.is_set}, daemon=True)
    thread.start()
    try:
        clients = [SplitClient(connect=server.endpoint, client_key=tmp_path / n / f"{n}.key_secret",
                               server_public_key=tmp_path / "server" / "server.key", name=n) for n in ("a", "b")]
        data = load_dataset(data="circles", num_items=6)
        secrets = {"a": SECRET, "b": ClientSecret(bytes(32))}
        results = [train_split_client(client=client, pipeline=tiny, dataset=data, epochs=1, batch_size=3,
                                      config=SplitConfig(), secret=secrets[n], ledger=SentLedger(tmp_path / f"{n}.db"))
                   for n, client in zip(("a", "b"), clients)]
        assert job.trainer.steps == 4 and [r.applied for r in results] == [2, 2]  # each client's own count
        # The same batches again (say after a reconnect, or a second call): acknowledged, never trained twice.
        again = train_split_client(client=clients[0], pipeline=tiny, dataset=data, epochs=1, batch_size=3,
                                   config=SplitConfig(), secret=SECRET, ledger=SentLedger(tmp_path / "a.db"))
        assert (again.applied, again.duplicates, job.trainer.steps) == (2, 2, 4)
        downloaded = download_controlnet(client=clients[1])
        for key, value in job.trainer.controlnet.state_dict().items():
            assert torch.equal(downloaded.state_dict()[key], value.float()), key
        for client in clients:
            client.close()
    finally:
        stop.set()
        thread.join()
        server.close()


def test_hardened_mode_sends_at_most_a_twentieth_of_the_reference_layout_at_sd15_shapes(load_bench):
    figures = load_bench("split").wire_bytes_per_sample(resolution=512, batch=16)
    assert figures["hardened"] <= figures["reference"] / 20, figures
    assert 3 * 64 * 64 * 4 * 2 < figures["hardened"] < 3 * 64 * 64 * 4 * 2 + 1000  # z_t, h, label in fp16, plus t


@pytest.mark.parametrize("server", ["process", "thread"])
def test_throughput_bench_runs_the_same_steps_in_process_and_over_loopback(load_bench, server):
    figures = load_bench("split").training_throughput(model="tiny", device="cpu", dtype="fp32", resolution=None,
                                                      batch=4, steps=2, warmup=1, server=server)
    assert figures["in_process_samples_per_s"] > 0 and figures["loopback_samples_per_s"] > 0
    assert figures["server_steps"] >= 3 and figures["latent_side"] == 8 and figures["server"] == server


def test_a_restarted_job_continues_exactly_and_skips_batches_it_already_applied(tiny, batch, tmp_path):
    import copy

    from privdiff.pipelines.split_controlnet import SplitJob, SplitTrainer
    from privdiff.transport.codec import Message

    pixels, hints = batch

    def message(step):
        return Message(kind="batch", fields={"batch_id": f"batch-{step}"}, tensors=client_payload(
            pipeline=tiny, pixels=pixels, hint_pixels=hints, image_ids=IDS, epoch=step, config=SplitConfig(),
            secret=SECRET))

    straight = SplitJob(trainer=SplitTrainer(unet=copy.deepcopy(tiny.unet), learning_rate=1e-3))
    for step in range(3):
        straight("a", message(step))
    first = SplitJob(trainer=SplitTrainer(unet=copy.deepcopy(tiny.unet), learning_rate=1e-3))
    for step in range(2):
        first("a", message(step))
    first.save_checkpoint(tmp_path / "job")
    restarted = SplitJob(trainer=SplitTrainer(unet=copy.deepcopy(tiny.unet), learning_rate=1e-3))
    restarted.load_checkpoint(tmp_path / "job")
    assert restarted("a", message(1)).fields == {"applied": 2, "duplicate": True}  # re-sent after the restart
    assert restarted("a", message(2)).fields == {"applied": 3, "duplicate": False}
    for key, value in straight.trainer.controlnet.state_dict().items():
        assert torch.allclose(restarted.trainer.controlnet.state_dict()[key], value, atol=1e-6), key
    assert restarted("b", message(2)).fields == {"applied": 1, "duplicate": False}  # another key: its own batch


@pytest.mark.parametrize("mode", ["paper", "hardened"])
def test_cli_split_attack_trains_on_loopback_and_scores_what_the_server_recorded(mode, capsys, tmp_path):
    import json
    import re
    import warnings

    from privdiff.cli import main

    # A fixed secret, so the noise (and the figures) are the same on every run.
    secret = tmp_path / "test.split-secret"
    secret.write_text(json.dumps({"format": "privdiff-split-secret", "key": bytes(range(32)).hex()}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["split", "attack", "--base", "tiny", "--data", "circles", "--mode", mode, "--num-items", "8",
                     "--epochs", "3", "--batch-size", "4", "--optimisation-steps", "0",
                     "--noise-secret", str(secret)]) == 0
    out = capsys.readouterr().out
    assert "6 server steps" in out
    best, mean = (float(v) for v in re.search(r"linked: ([\d.]+) dB PSNR.*mean-image guess ([\d.]+) dB", out).groups())
    if mode == "paper":
        assert best >= 30, out
    else:
        from privdiff.privacy.threat_model import SPLIT_DEFAULT_IMAGE_MARGIN_DB

        assert best <= mean + SPLIT_DEFAULT_IMAGE_MARGIN_DB, out


def test_circles_bench_trains_scores_and_draws_its_grid(load_bench, tmp_path):
    import argparse

    from PIL import Image

    bench = load_bench("split_circles")
    args = argparse.Namespace(mode="hardened", snr_bound=1.0, sigma_hint=0.0, draws_per_image=1, seed=0, num_items=16,
                              steps=2, batch=4, learning_rate=1e-3, eval_every=2, eval_num=4, out=None,
                              grid=str(tmp_path / "grid.png"))
    result = bench.utility(args)
    assert result["evaluations"][-1]["step"] == 2 and 0 <= result["evaluations"][-1]["circle_iou"] <= 1
    assert 0 < result["base"]["circle_iou"] < 1
    assert Image.open(tmp_path / "grid.png").size[0] > 8 * 64
