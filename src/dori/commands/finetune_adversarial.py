"""``dori finetune adversarial``: adversarial fine-tuning (Finding Dori, Section 4.4, Algorithm 2).

Surrogate images follow :mod:`dori.mitigations.surrogate_policy`: by default the memorizing model makes its own
(no flag needed); or ``--surrogates DIR``, or generated under ``--surrogate-mitigation nemo:DIR``, or by
``--surrogate-model M``. ``--check-utility K`` runs the Appendix
I.7 check on the first K utility pairs.
"""

from __future__ import annotations

from dori.commands.common import DTYPES, load_model_from_args
from dori.commands.finetune_common import (
    add_common,
    add_surrogate_args,
    copy_check,
    finish,
    load_items,
    log_to_stderr,
    surrogates,
)
from dori.mitigations.adversarial_ft import INIT_SCHEDULES, LR_SCHEDULES, UTILITY_TARGETS


def add_method(methods) -> None:
    p = methods.add_parser("adversarial", help="adversarial fine-tuning (Algorithm 2), surrogates as targets")
    add_common(p)
    add_surrogate_args(p)
    g = p.add_argument_group("adversarial fine-tuning")
    g.add_argument("--epochs", type=int, default=None, help="default: the method's")
    g.add_argument("--steps-per-embedding", type=int, default=3, help="S (Table 16 one step: 1)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--items-per-step", type=int, default=1)
    g.add_argument("--embeddings-per-item", type=int, default=None, help="default: the method's")
    g.add_argument("--utility-set", default="unique", help="non-memorized image-caption pairs")
    g.add_argument(
        "--n-utility",
        type=int,
        default=None,
        help="first K utility pairs (default: all of them; fewer pairs are seen more often and FID rose "
        "with the passes over them, docs/results/adversarial_ft.md)",
    )
    g.add_argument(
        "--noise-draws", type=int, default=None,
        help="(surrogate, noise, t) draws per adversarial embedding per update (default 8; 1 = Algorithm 2 literally)",
    )  # fmt: skip
    g.add_argument(
        "--utility-batch", type=int, default=None,
        help="utility pairs per update (default 64; 0 = as many as adversarial samples, App. I.1)",
    )  # fmt: skip
    g.add_argument(
        "--utility-weight", type=float, default=None,
        help="lambda in L_adv + lambda * L_DM (default 10; 1 = Algorithm 2's plain sum)",
    )  # fmt: skip
    g.add_argument("--dori-steps", type=int, default=50, help="Dori steps per search (0: the init itself)")
    g.add_argument("--dori-lr", type=float, default=0.1)
    g.add_argument("--dori-batch", type=int, default=8)
    g.add_argument("--init-schedule", default=None, choices=INIT_SCHEDULES, help="default: the method's")
    g.add_argument(
        "--persistent", type=int, default=None,
        help="embeddings per item whose search continues from the previous epoch's (default: the method's)",
    )  # fmt: skip
    g.add_argument(
        "--uncond-share", type=float, default=None,
        help="share of utility pairs trained with the empty prompt (caption dropout; default: the method's)",
    )  # fmt: skip
    g.add_argument(
        "--ema", type=float, default=None,
        help="keep an exponential moving average of the weights with this decay and return it (default: the method's)",
    )  # fmt: skip
    g.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES, help="default: the method's")
    g.add_argument(
        "--utility-target", default=None, choices=UTILITY_TARGETS,
        help="utility loss against the drawn noise (data, Algorithm 2), the unmitigated model's prediction "
        "(teacher), or its prediction with the caption and its guided prediction (guided); default: the method's",
    )  # fmt: skip
    g.add_argument(
        "--utility-guidance", type=float, default=None,
        help="the guidance of --utility-target guided (default: the method's, the protocol's 7)",
    )  # fmt: skip
    g.add_argument(
        "--adv-min-timestep", type=int, default=None,
        help="draw the mitigation loss's timesteps from [this, T) (default: the method's; 0 = all, Algorithm 2)",
    )  # fmt: skip
    g.add_argument("--no-utility-loss", action="store_true", help="Table 16 ablation")
    g.add_argument("--no-mitigation-loss", action="store_true", help="Table 16 ablation")
    g.add_argument("--lora", action="store_true", help="LoRA rank 128 instead of full fine-tuning")
    g.add_argument("--lora-rank", type=int, default=128)
    g.add_argument("--lora-convs", action="store_true", help="LoRA on convolutions too")
    g.add_argument("--autocast", default=None, choices=["bf16", "fp16"], help="autocast (GPU)")
    g.add_argument(
        "--stop-mr", type=float, default=None,
        help="stop once the epoch's own Dori embeddings replicate at most this share of items (default: off)",
    )  # fmt: skip
    g.add_argument("--stop-generations", type=int, default=4, help="generations per item for --stop-mr")
    g.add_argument("--check-utility", type=int, default=0, help="App. I.7 check on the first K utility pairs")
    p.set_defaults(func=run)


def method_from_args(args):
    """The :class:`AdversarialFineTuning` of the options (settings are checked here, before minutes of
    surrogate generation)."""
    from dori.mitigations.adversarial_ft import AdversarialFineTuning

    defaults = AdversarialFineTuning()

    def given(name: str):  # the option where given, else the method's default
        value = getattr(args, name)
        return getattr(defaults, name) if value is None else value

    schedule, persistent = given("init_schedule"), given("persistent")
    return AdversarialFineTuning(
        epochs=given("epochs"),
        steps_per_embedding=args.steps_per_embedding,
        lr=args.lr or defaults.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None,
        items_per_step=args.items_per_step,
        embeddings_per_item=args.embeddings_per_item or (2 if schedule == "both" else 1) + persistent,
        noise_draws=given("noise_draws"),
        utility_batch=defaults.utility_batch if args.utility_batch is None else (args.utility_batch or None),
        dori_steps=args.dori_steps,
        dori_lr=args.dori_lr,
        dori_batch=args.dori_batch,
        init_schedule=schedule,
        persistent=persistent,
        uncond_share=given("uncond_share"),
        utility_loss=not args.no_utility_loss,
        utility_weight=given("utility_weight"),
        utility_target=given("utility_target"),
        utility_guidance=given("utility_guidance"),
        adv_min_timestep=given("adv_min_timestep"),
        mitigation_loss=not args.no_mitigation_loss,
        lora_rank=args.lora_rank if (args.lora or args.lora_convs) else None,
        lora_convs=args.lora_convs,
        stop_mr=args.stop_mr,
        stop_generations=args.stop_generations,
        ema=defaults.ema if args.ema is None else (args.ema or None),
        lr_schedule=given("lr_schedule"),
        seed=args.seed,
        autocast_dtype=DTYPES[args.autocast] if args.autocast else None,
    )


def run(args) -> int:
    from dori.data.sets import load_set
    from dori.mitigations.surrogate_policy import utility_memorization_check
    from dori.models.pipeline import SamplingConfig

    model = load_model_from_args(args)
    items = load_items(args, model)
    ft = method_from_args(args)
    surr = None if args.no_mitigation_loss else surrogates(args, model, items)
    utility = [] if args.no_utility_loss else load_set(args.utility_set, model, limit=args.n_utility)
    sampling = SamplingConfig(steps=args.sample_steps, guidance=args.guidance)
    check = {}
    if args.stop_mr is not None:
        similarity, threshold, _ = copy_check(args, model)
        check = dict(similarity=similarity, threshold=threshold, sampling=sampling)
    tuned = ft(model, items, args.out, surrogates=surr, utility=utility, log=log_to_stderr(args), **check)
    summary = {"settings": ft.settings(), "skipped": {} if surr is None else surr.failed}
    if args.check_utility > 0 and utility:
        similarity, threshold, _ = copy_check(args, model)
        summary["utility_memorization"] = utility_memorization_check(
            model, tuned, utility[: args.check_utility], similarity, threshold, args.seed, sampling, args.out
        )
    return finish(args, summary)
