"""The `privdiff` command's options. Subcommands share option names: --base, --data, --out, --seed."""

from __future__ import annotations

import argparse
import sys

from ..vocabulary import FORMER_FLAGS, former_notice


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (`privdiff <command>: error: …`), exit 2, like every
    other error the command reports."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)", file=sys.stderr)
        raise SystemExit(2)


class _FormerFlag(argparse.Action):
    """A flag's former name: it sets the current option and leaves a notice for the console."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.former_flags = (*namespace.former_flags, former_notice(option_string, FORMER_FLAGS[option_string]))


def _option(parser, name: str, **kwargs) -> None:
    """`name`, plus its former names (vocabulary.FORMER_FLAGS), hidden from --help, for one release."""
    action = parser.add_argument(name, **kwargs)
    for old in (old for old, new in FORMER_FLAGS.items() if new == name):
        parser.add_argument(old, dest=action.dest, type=kwargs.get("type"), default=argparse.SUPPRESS,
                            action=_FormerFlag, help=argparse.SUPPRESS)


def _leaf(sub, name: str, *, help: str, handler: str) -> Parser:
    """A runnable subcommand: its handler is 'module:function' in privdiff.cli (imported when run)."""
    parser = sub.add_parser(name, help=help)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="more detail: libraries' own messages (Flower's per-round lines), and on an error the "
                             "traceback")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the results")
    parser.set_defaults(handler=handler, command_name=parser.prog.removeprefix("privdiff "), former_flags=())
    return parser


def _add_base(parser) -> None:
    parser.add_argument("--base", default="tiny",
                        help="base model: 'tiny' (built in), a diffusers model folder, or a .safetensors/.ckpt file")
    parser.add_argument("--config", default=None,
                        help="for a single file of a non-standard size: a diffusers folder with the same architecture")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for a single-file checkpoint")
    parser.add_argument("--tokenizer-2", default=None, help="second tokenizer folder (SDXL single files)")


def _add_adjacency(parser) -> None:
    parser.add_argument("--adjacency", default="add-remove", choices=["add-remove", "replace-one"],
                        help="which datasets the guarantee calls neighbours: one unit added or removed (default), "
                             "or one replaced by another (σ is calibrated for it; the record states it)")


def _add_common(parser, *, data_default: str | None = None, out_required: bool = True) -> None:
    parser.add_argument("--data", default=data_default,
                        help="a folder of images with captions, or a procedural set's name (circles, shapes, ...)")
    parser.add_argument("--out", required=out_required, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_split_settings(parser) -> None:
    parser.add_argument("--mode", default="hardened", choices=["hardened", "paper"],
                        help="paper: the reference design, which gives the images away (for reproduction only)")
    parser.add_argument("--snr-bound", type=float, default=None, help="hardened: largest SNR of a timestep drawn")
    parser.add_argument("--sigma-label", type=float, default=None, help="hardened: noise on the label")
    parser.add_argument("--sigma-hint", type=float, default=None, help="hardened: noise on the hint latent")
    parser.add_argument("--draws-per-image", type=int, default=None,
                        help="hardened: distinct noisings per image over the whole run (default 1; 0: a fresh one "
                             "every epoch)")


def build_parser() -> Parser:
    from .. import __version__

    parser = Parser(prog="privdiff", description="Private adaptation of diffusion models.")
    parser.add_argument("--version", action="version", version=f"privdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _leaf(sub, "demo", help="run every feature on the built-in tiny model and procedural data",
                 handler="train:demo")
    _add_base(demo)
    _add_common(demo, out_required=True)
    demo.add_argument("--only", default=None, help="run one feature only (see the summary for names)")

    pretrain = _leaf(sub, "pretrain", help="pretrain privdiff-tiny from scratch on the public corpus (shapes, glyphs, textures)",
                     handler="train:pretrain")
    _add_common(pretrain, out_required=True)
    pretrain.add_argument("--unet-steps", type=int, default=None, help="UNet + text encoder steps (default 5000)")
    pretrain.add_argument("--vae-steps", type=int, default=None, help="autoencoder steps on 32 px crops (default 4000)")
    pretrain.add_argument("--num-images", type=int, default=None, help="public images rendered (default 24000)")
    pretrain.add_argument("--resume", action="store_true", help="continue a stopped pretraining from its checkpoint")

    train = sub.add_parser("train", help="private fine-tuning")
    methods = train.add_subparsers(dest="method", required=True, metavar="METHOD")
    _add_dp_ldm(_leaf(methods, "dp-ldm", help="DP-SGD fine-tuning of the UNet's attention (DP-LDM)",
                      handler="train:dp_ldm"))
    _add_dp_ti(_leaf(methods, "dp-ti", help="differentially private Textual Inversion (DPAgg-TI or DP-SGD TI)",
                     handler="train:dp_ti"))

    audit = sub.add_parser("audit", help="measure what a released model gives away")
    attacks = audit.add_subparsers(dest="attack", required=True, metavar="ATTACK")
    mia = _leaf(attacks, "mia", help="loss-threshold membership inference on a DP-LDM output", handler="audit:mia")
    _add_base(mia)
    _add_common(mia, data_default=None, out_required=True)
    mia.add_argument("--weights", default=None,
                     help="a DP-LDM output folder or weights file (default: audit the base model itself)")
    mia.add_argument("--num-members", type=int, required=True,
                     help="how many items the run trained on (its --num-items); members are items 0..N-1")
    mia.add_argument("--nonmember-data", default=None,
                     help="held-out images of the same source (needed for a folder; default: the set's next items)")
    mia.add_argument("--num-nonmembers", type=int, default=None, help="default: as many as members")
    _add_canary_audit(_leaf(attacks, "canary", help="canary audit: an empirical lower bound on ε from one DP-LDM run "
                                                    "with gradient canaries, next to the ε it records",
                            handler="audit:canary"))

    fed = sub.add_parser("fed", help="federated diffusion on Flower (FedAvg across clients)")
    fed_actions = fed.add_subparsers(dest="fed_action", required=True, metavar="ACTION")
    _add_fed_simulate(_leaf(fed_actions, "simulate", help="a Flower simulation: one SuperNode per client on this "
                                                          "machine", handler="fed:simulate"))
    certs = _leaf(fed_actions, "certs", help="TLS files for a SuperLink and authentication keys for SuperNodes",
                  handler="fed:certs")
    certs.add_argument("--out", required=True, help="folder for ca.crt, server.pem, server.key and the node keys")
    certs.add_argument("--nodes", nargs="+", default=[], help="one key pair per SuperNode (site) name")
    certs.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1", "::1"],
                       help="names and addresses the SuperLink is reached at")

    split = sub.add_parser("split", help="split-learning ControlNet: keys, a training server, a client")
    split_actions = split.add_subparsers(dest="split_action", required=True, metavar="ACTION")
    _add_split(split_actions)

    inspect = _leaf(sub, "inspect", help="tell what a checkpoint or release holds (reads names, shapes and its "
                                         "privacy record only)", handler="audit:inspect")
    inspect.add_argument("checkpoint", help="a .safetensors or .ckpt file")
    return parser


def _add_dp_ldm(ldm) -> None:
    _add_base(ldm)
    _add_common(ldm, data_default=None, out_required=True)
    ldm.add_argument("--epsilon", type=float, default=10.0, help="target ε (default 10)")
    ldm.add_argument("--no-dp", action="store_true", help="train WITHOUT privacy, for comparison runs only")
    ldm.add_argument("--delta", type=float, default=None, help="δ (default 1/(10 N))")
    ldm.add_argument("--epochs", type=float, default=10.0)
    ldm.add_argument("--batch-size", type=int, default=32, help="expected logical batch size (sample rate B/N)")
    ldm.add_argument("--physical-batch-size", type=int, default=16,
                     help="rows per forward pass (what fits in memory); the logical batch runs in such micro-batches, "
                          "noise added once per logical step")
    ldm.add_argument("--noise-draws", type=int, default=1,
                     help="noise multiplicity K (DPDM): each example's loss is the mean over K (timestep, noise) "
                          "draws, clipped once; K times the compute, the same ε; at most --physical-batch-size "
                          "(default 1)")
    _option(ldm, "--clip-norm", type=float, default=0.01, help="per-example L2 clipping bound C (default 0.01)")
    _option(ldm, "--learning-rate", type=float, default=1e-4, help="learning rate at batch 32 (scaled with the batch)")
    ldm.add_argument("--trainable", default="attention",
                     choices=["cross_attention", "attention", "transformer", "lora", "full"],
                     help="what is trained (default attention; lora writes one standard LoRA file)")
    ldm.add_argument("--lora-rank", type=int, default=4, help="LoRA rank for --trainable lora")
    ldm.add_argument("--conditioning-word", action="append", default=None,
                     help="also train this public word's token-table row (repeatable; e.g. class names the "
                          "base model never saw; never words taken from the private captions)")
    ldm.add_argument("--conditioning-clip-share", type=float, default=0.0,
                     help="share of the clipping budget C² kept for the conditioning rows (group-wise clipping; "
                          "ε is unchanged; default 0: one joint clip)")
    ldm.add_argument("--ablation-blocks", type=int, default=0, help="train only transformer blocks >= k")
    ldm.add_argument("--backend", default="privdiff", choices=["privdiff", "opacus"],
                     help="per-sample clipping: privdiff's fast clipping (default) or opacus' hooks (reference)")
    ldm.add_argument("--privacy-unit", default="example", choices=["example", "subject"])
    ldm.add_argument("--max-examples-per-subject", type=int, default=1)
    ldm.add_argument("--num-items", type=int, default=None,
                     help="items of a built-in set (default: its own size, at most 1,000 so a first run takes minutes)")
    ldm.add_argument("--resume", action="store_true", help="continue a stopped run from its checkpoint")
    ldm.add_argument("--device", default=None, help="where to train: cuda, cpu, ... (default: cpu)")
    ldm.add_argument("--sample-prompt", action="append", default=None,
                     help="prompt for samples.png (repeatable; default: the set's public prompt templates)")
    _add_adjacency(ldm)
    ldm.add_argument("--keep-byproducts", action="store_true",
                     help="keep loss curve and checkpoint (computed on private data, NOT covered by ε)")


def _add_canary_audit(canary) -> None:
    _add_base(canary)
    _add_common(canary, data_default="shapes", out_required=True)
    canary.add_argument("--method", default="dp-ldm", choices=["dp-ldm", "dpsgd-ti", "federated", "gaussian"],
                        help="dp-ldm: a real DP-LDM fine-tune with canaries (default); dpsgd-ti: a real DP-SGD "
                             "Textual Inversion run; federated: Flower's client-level DP with canary clients; "
                             "gaussian: the reference mechanism, exactly (ε, δ)-DP, in a second")
    canary.add_argument("--epsilon", type=float, default=8.0, help="the audited run's target ε (default 8)")
    canary.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5; at most 1/(2 × canaries))")
    canary.add_argument("--canaries", type=int, default=1000,
                        help="canary units, each included with probability 1/2 (default 1000; more: a tighter bound)")
    canary.add_argument("--confidence", type=float, default=0.99, help="confidence of the bound (default 0.99)")
    canary.add_argument("--runs", type=int, default=1,
                        help="independent runs whose canaries are audited together (default 1; 10: a tighter bound "
                             "at 10 times the time)")
    canary.add_argument("--guesses", default="grid", choices=["grid", "planned"],
                        help="grid: the best of several guess counts (union bound); planned: one count chosen in "
                             "advance from ε and the number of canaries (tighter)")
    canary.add_argument("--epochs", type=float, default=4.0, help="passes over the data (default 4)")
    canary.add_argument("--batch-size", type=int, default=None,
                        help="expected batch (sample rate B/N; default N, full batches: the tightest audit)")
    canary.add_argument("--physical-batch-size", type=int, default=64, help="rows per forward pass (default 64)")
    _option(canary, "--clip-norm", type=float, default=0.01, help="per-example L2 clipping bound C (default 0.01)")
    _option(canary, "--learning-rate", type=float, default=1e-4, help="learning rate at batch 32 (scaled with the "
                                                                       "batch)")
    canary.add_argument("--trainable", default="attention", choices=["cross_attention", "attention", "transformer",
                                                                     "lora", "full"],
                        help="what is trained, and where the canaries live (default attention)")
    canary.add_argument("--num-items", type=int, default=64, help="items of the data the run trains on (default 64)")
    canary.add_argument("--num-vectors", type=int, default=32,
                        help="dpsgd-ti: token vectors (default 32: the audit needs as many trained values as canaries)")
    canary.add_argument("--num-clients", type=int, default=3, help="federated: real clients beside the canary clients")
    canary.add_argument("--rounds", type=int, default=3, help="federated: rounds (default 3)")
    _option(canary, "--client-clip-norm", type=float, default=0.1,
            help="federated: each client's update is clipped to this L2 norm (default 0.1)")
    canary.add_argument("--real-clients", default="stand-in", choices=["stand-in", "trained"],
                        help="federated: stand-in (random updates of norm 2C: seconds) or trained (privdiff's "
                             "ClientApp on --data: about 5 GB and minutes per round)")


def _add_dp_ti(ti) -> None:
    _add_base(ti)
    _add_common(ti, data_default=None, out_required=True)
    ti.add_argument("--method", dest="ti_method", default="dpagg", choices=["dpagg", "dpsgd"])
    ti.add_argument("--token", required=True, help='the new token, e.g. "<my-style>"')
    ti.add_argument("--init-word", default="painting", help="a one-token word the embedding starts from")
    ti.add_argument("--num-vectors", type=int, default=1)
    ti.add_argument("--template", default="a picture in the style of {token}", help="training prompt ({token})")
    ti.add_argument("--epsilon", type=float, default=1.0)
    ti.add_argument("--no-dp", action="store_true", help="dpagg without noise or clipping bound: comparison only")
    ti.add_argument("--delta", type=float, default=None, help="δ (default 1/(10 n))")
    _option(ti, "--clip-norm", type=float, default=None,
            help="the L2 bound C: dpagg, on each embedding's centred norm (default 0.5); dpsgd, on each example's "
                 "gradient (default 0.01)")
    ti.add_argument("--sample-rate", type=float, default=1.0, help="dpagg: Poisson subsampling rate q")
    ti.add_argument("--num-subsets", type=int, default=None, help="dpagg: disjoint subsets (default: one per image)")
    ti.add_argument("--steps", type=int, default=100, help="dpagg: optimisation steps of every embedding")
    ti.add_argument("--epochs", type=float, default=20.0, help="dpsgd: passes over the data")
    ti.add_argument("--batch-size", type=int, default=16)
    _option(ti, "--learning-rate", type=float, default=5e-3)
    ti.add_argument("--privacy-unit", default="example", choices=["example", "subject"],
                    help="subject: the guarantee covers each person's images together (needs subject ids)")
    ti.add_argument("--max-examples-per-subject", type=int, default=1, help="dpsgd with --privacy-unit subject")
    ti.add_argument("--num-items", type=int, default=None,
                    help="items of a built-in set (default: its own size, at most 1,000)")
    ti.add_argument("--resume", action="store_true", help="continue a stopped run from its checkpoint")
    ti.add_argument("--checkpoint-every", type=int, default=25,
                    help="steps between checkpoints (a hard kill loses no more; default 25)")
    ti.add_argument("--a1111", action="store_true", help="also write an A1111 .pt (with a .privacy.json sidecar)")
    _add_adjacency(ti)


def _add_fed_simulate(simulate) -> None:
    _add_base(simulate)
    _add_common(simulate, data_default="digits", out_required=True)
    simulate.add_argument("--num-items", type=int, default=600, help="examples shared among the clients")
    simulate.add_argument("--heldout-items", type=int, default=100, help="held-out examples for the per-round loss")
    _option(simulate, "--num-clients", type=int, default=3)
    simulate.add_argument("--rounds", type=int, default=3)
    simulate.add_argument("--beta", type=float, default=None, help="Dirichlet non-IID split by label (default: IID)")
    simulate.add_argument("--trainable", default="attention", help="what travels and trains: attention, lora, full, ...")
    simulate.add_argument("--local-epochs", type=float, default=1.0)
    simulate.add_argument("--batch-size", type=int, default=32)
    _option(simulate, "--learning-rate", type=float, default=1e-4)
    simulate.add_argument("--local-epsilon", type=float, default=None,
                          help="local DP-SGD on each client: its TOTAL ε over all rounds (σ is calibrated over "
                               "rounds × local steps; default off)")
    _option(simulate, "--client-noise-multiplier", type=float, default=None,
            help="client-level DP (Flower, clipping on clients): noise multiplier z (default off)")
    _option(simulate, "--client-clip-norm", type=float, default=0.1,
            help="client-level DP: L2 bound C on each client's update (default 0.1)")
    _option(simulate, "--client-delta", type=float, default=None,
            help="client-level DP: δ (default min(1e-5, 0.1/clients), well below 1/clients)")
    _add_adjacency(simulate)
    simulate.add_argument("--keep-byproducts", action="store_true",
                          help="keep the held-out losses, client reports and their plot (computed on private items, "
                               "NOT covered by ε) in <out>/byproducts-not-covered-by-dp")
    simulate.add_argument("--secure-aggregation", action="store_true",
                          help="Flower's SecAgg+: the server sees only the sum of the clients' models")
    simulate.add_argument("--proximal-mu", type=float, default=0.0,
                          help="FedProx (Flower's strategy): each client adds (mu/2)·||w - w_global||² to its "
                               "objective, keeping non-IID clients near the global model (default 0: FedAvg)")
    simulate.add_argument("--settings", default=None,
                          help="take every setting from this JSON file (FederatedConfig's fields) instead of the options")


def _add_split(actions) -> None:
    keys = _leaf(actions, "keys", help="create a CurveZMQ key pair (<name>.key public, <name>.key_secret)",
                 handler="split:keys")
    keys.add_argument("--out", required=True, help="folder for the key files")
    keys.add_argument("--name", required=True, help="'server', or a client's name")
    serve = _leaf(actions, "serve", help="run a training job's server (Ctrl-C: checkpoint and stop)",
                  handler="split:serve")
    _add_base(serve)
    serve.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint to listen on")
    serve.add_argument("--server-key", required=True, help="the server's .key_secret file")
    serve.add_argument("--allowed-clients", required=True, help="folder of the admitted clients' public .key files")
    serve.add_argument("--out", required=True, help="job folder: checkpoints (resumed from when present)")
    _option(serve, "--learning-rate", type=float, default=1e-5)
    serve.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    serve.add_argument("--seed", type=int, default=0)
    client = _leaf(actions, "train", help="send a private dataset's batches to a server, then download the trained "
                                          "ControlNet", handler="split:train")
    _add_base(client)
    _add_common(client, data_default=None, out_required=True)
    client.add_argument("--connect", default="tcp://127.0.0.1:5555")
    client.add_argument("--client-key", required=True, help="this client's .key_secret file")
    client.add_argument("--noise-secret", default=None,
                        help="the client's noise secret (made on first use; its ledger of sent images beside it); "
                             "default: <client key's name>.split-secret beside the key. Use one for every job and "
                             "server: an image must never get two noisings")
    client.add_argument("--server-key", required=True, help="the server's public .key file")
    _add_split_settings(client)
    client.add_argument("--target-margin-db", type=float, default=None,
                        help="let the planner choose k and σ_hint: the most hint-following whose predicted image "
                             "and hint attack margins stay within this many dB (see `privdiff split plan`)")
    client.add_argument("--epochs", type=int, default=1)
    client.add_argument("--batch-size", type=int, default=16)
    client.add_argument("--num-items", type=int, default=None,
                        help="items of a built-in set (default: its own size, at most 1,000)")
    client.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply")
    plan = _leaf(actions, "plan", help="predict, from the measured frontier, the settings that learn most within a "
                                       "target attack margin, and what to expect", handler="split:plan")
    plan.add_argument("--images", type=int, required=True, help="private images in the run (one noising each)")
    plan.add_argument("--target-margin-db", type=float, default=3.0,
                      help="largest attack margin over the mean-image guess, for images and hints (default 3)")
    attack = _leaf(actions, "attack", help="train a short job on loopback, record the traffic as the server sees it "
                                           "and run the server's attacks on it", handler="split:attack")
    _add_base(attack)
    _add_common(attack, data_default="circles", out_required=False)
    _add_split_settings(attack)
    attack.add_argument("--noise-secret", default=None,
                        help="a client's noise secret, so the traffic is exactly what that client sends "
                             "(default: a throwaway one)")
    attack.add_argument("--num-items", type=int, default=32, help="private images (default 32)")
    attack.add_argument("--epochs", type=int, default=5)
    attack.add_argument("--batch-size", type=int, default=8)
    attack.add_argument("--optimisation-steps", type=int, default=100,
                        help="steps of the total-variation inversion attack (0: skip it)")
