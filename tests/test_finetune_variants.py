"""``dori finetune esd|ca|siss``: each sub-command builds the method object its options describe; left-out
options take the method's own defaults (the reference's), the paper's setting only with ``--variant paper``."""

import pytest

from dori.cli import build_parser
from dori.commands.finetune_ca import build_ca
from dori.commands.finetune_esd import build_esd
from dori.commands.finetune_siss import build_siss
from dori.errors import DoriError
from dori.mitigations.concept_ablation import ConceptAblation
from dori.mitigations.esd import ESD
from dori.mitigations.siss import SISS

BUILD = {"esd": build_esd, "ca": build_ca, "siss": build_siss}


def built(method, *options):
    args = build_parser().parse_args(["finetune", method, "--set", "vm", "--out", "o", *options])
    return BUILD[method](args)


@pytest.mark.parametrize(
    "method, options, expected",
    [
        ("esd", [], ESD()),
        ("esd", ["--variant", "paper"], ESD(variant="paper")),
        ("ca", [], ConceptAblation()),
        ("ca", ["--variant", "paper"], ConceptAblation(variant="paper")),
        ("siss", [], SISS()),
        ("siss", ["--variant", "paper"], SISS(variant="paper")),
        ("siss", ["--variant", "surrogates"], SISS(variant="surrogates")),
    ],
)
def test_defaults_are_the_methods_own(method, options, expected):
    assert built(method, *options) == expected


def test_reference_defaults_are_the_reference_settings():
    # the values PARITY.md names for each reference, so a changed dataclass default cannot pass silently
    esd = built("esd")
    assert (esd.variant, esd.iterations, esd.scheduler, esd.resolution, esd.dtype) == (
        "reference", 200, "pndm", 1024, "bfloat16"
    )  # fmt: skip
    assert (esd.negative_guidance, esd.sample_guidance, esd.lr, esd.seed) == (2.0, 3.0, 5e-5, 0)
    assert built("esd", "--variant", "paper").iterations == 10_000
    ca = built("ca")
    assert (ca.steps, ca.learning_rate, ca.augment, ca.anchor_steps, ca.anchor_guidance) == (
        400,
        2e-6,
        True,
        25,
        6.0,
    )
    assert (ca.anchor_threshold, ca.anchor_images, ca.weight_decay, ca.seed) == (0.5, 1000, 1e-2, 42)
    assert built("ca", "--variant", "paper").steps == 12_000
    siss = built("siss")
    assert (siss.variant, siss.steps, siss.grad_accum, siss.timestep, siss.scaling_norm) == (
        "reference", 35, 16, 999, 750.0
    )  # fmt: skip
    assert (siss.lr, siss.n_images, siss.latent_sample, siss.seed) == (1e-5, 128, True, 42)


def test_given_options_override_only_themselves():
    esd = built("esd", "--variant", "paper", "--iterations", "7", "--resolution", "model",
                "--train-dtype", "float32", "--scheduler", "ddim", "--seed", "3")  # fmt: skip
    assert esd == ESD(
        variant="paper", iterations=7, resolution=None, dtype="float32", scheduler="ddim", seed=3
    )
    assert built("esd", "--resolution", "512").resolution == 512
    ca = built(
        "ca", "--variant", "paper", "--steps", "5", "--no-augment", "--no-scale-lr", "--anchor-images", "4"
    )
    assert ca == ConceptAblation(variant="paper", steps=5, augment=False, scale_lr=False, anchor_images=4)
    assert built("ca", "--iterations", "9").steps == 9  # the old spelling
    siss = built(
        "siss", "--variant", "paper", "--scaling-norm", "auto", "--timestep", "uniform", "--steps", "2"
    )
    assert siss == SISS(variant="paper", scaling_norm=None, timestep=None, steps=2)
    assert built("siss", "--scaling-norm", "12.5", "--timestep", "500").scaling_norm == 12.5


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("esd", ["--resolution", "huge"], "--resolution must be 'model' or a side"),
        ("siss", ["--timestep", "-3"], "--timestep must be a timestep"),
        ("siss", ["--scaling-norm", "0"], "--scaling-norm must be a positive number"),
        ("siss", ["--surrogates", "DIR"], "only apply to --variant surrogates"),
        ("siss", ["--n-images", "0"], "--n-images must be at least 1"),
    ],
)
def test_bad_options_are_refused(method, options, message):
    with pytest.raises(DoriError, match=message):
        built(method, *options)


@pytest.mark.parametrize("method, bad", [("esd", "--grad-accum"), ("esd", "--anchors"), ("ca", "--timestep"),
                                         ("ca", "--train-dtype"), ("siss", "--anchors"), ("siss", "--scheduler")])  # fmt: skip
def test_each_method_has_only_its_own_options(method, bad):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", method, "--set", "vm", "--out", "o", bad, "1"])
