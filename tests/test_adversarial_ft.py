import json

import pytest
import torch

from dori.data.sets import Item
from dori.errors import DoriError
from dori.metrics.replication import copy_similarity
from dori.mitigations import lora
from dori.mitigations.adversarial_ft import AdversarialFineTuning, guided_distillation
from dori.mitigations.surrogates import SurrogateSet, generate_surrogates, load_surrogates
from dori.mitigations.training import changed_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def _items(n, seed, prefix):
    g = torch.Generator().manual_seed(seed)
    return [
        Item(id=f"{prefix}{i}", prompt=f"a red circle {i}").with_image(torch.rand(3, 16, 16, generator=g))
        for i in range(n)
    ]


def _surrogates(items, k=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return SurrogateSet(images={it.id: torch.rand(k, 3, 16, 16, generator=g) for it in items})


def _adv_loss(model, x0, emb, n=64):
    g = torch.Generator().manual_seed(123)
    noise = torch.randn((n, *x0.shape[1:]), generator=g)
    t = torch.randint(0, model.num_train_timesteps, (n,), generator=g)
    with torch.no_grad():
        return float(model.training_loss(x0.expand(n, -1, -1, -1), emb.expand(n, -1, -1), t, noise).mean())


def test_one_step_changes_weights_and_lowers_adv_loss(tiny):
    items = _items(1, 0, "m")
    surr = SurrogateSet(images={"m0": torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))})
    ft = AdversarialFineTuning(
        epochs=1,
        steps_per_embedding=1,
        embeddings_per_item=32,
        dori_steps=0,
        init_schedule="prompt",
        utility_loss=False,
        lr=1e-3,
        grad_clip=None,
    )
    x_surr = tiny.encode_images(surr.images["m0"])
    emb = tiny.encode_text([items[0].prompt])
    before = _adv_loss(tiny, x_surr, emb)
    out = ft(tiny, items, surrogates=surr)
    after = _adv_loss(out, x_surr, emb)
    assert after < before
    assert len(changed_parameters(tiny.unet, out.unet)) > 0.5 * len(list(tiny.unet.parameters()))
    assert not any(p.requires_grad for p in out.unet.parameters())
    assert out.text_encoder is tiny.text_encoder  # frozen and shared
    assert _adv_loss(tiny, x_surr, emb) == before  # the input model is untouched


def test_resume_continues_at_the_right_epoch_and_matches_uninterrupted(tiny, tmp_path):
    items, utility = _items(2, 1, "m"), _items(3, 2, "u")
    surr = _surrogates(items)
    cfg = dict(steps_per_embedding=2, dori_steps=2, utility_batch=2, lr=1e-4, seed=3)
    full = AdversarialFineTuning(epochs=2, **cfg)(
        tiny, items, tmp_path / "a", surrogates=surr, utility=utility
    )

    AdversarialFineTuning(epochs=1, **cfg)(tiny, items, tmp_path / "b", surrogates=surr, utility=utility)
    log = tmp_path / "b" / "losses.jsonl"
    with open(log, "a") as f:  # a run killed half-way through epoch 2 left a partial record
        f.write(json.dumps({"kind": "step", "epoch": 2, "l_adv": 9.9}) + "\n")
    seen = []
    resumed = AdversarialFineTuning(epochs=2, **cfg)(
        tiny, items, tmp_path / "b", surrogates=surr, utility=utility, log=seen.append
    )
    assert {r.get("epoch") for r in seen} == {2}  # epoch 1 was not run again
    for (n, p), q in zip(full.unet.named_parameters(), resumed.unet.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert not any(r.get("l_adv") == 9.9 for r in records)
    assert (tmp_path / "b" / "checkpoints" / "epoch-0001" / "unet").is_dir()
    assert not (tmp_path / "b" / "checkpoints" / "epoch-0001" / "train_state.pt").exists()

    from dori.models.loading import load_model

    loaded = load_model(str(tmp_path / "b"))
    for p, q in zip(resumed.unet.parameters(), loaded.unet.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(DoriError, match="other settings"):
        AdversarialFineTuning(epochs=2, **dict(cfg, lr=1e-3))(
            tiny, items, tmp_path / "b", surrogates=surr, utility=utility
        )


def test_ablation_flags_and_skipped_items(tiny, tmp_path):
    items, utility = _items(2, 1, "m"), _items(2, 2, "u")
    surr = SurrogateSet(images={"m0": torch.rand(1, 3, 16, 16)}, failed={"m1": "replicas only"})
    seen = []
    # "No Mitigation Loss": no surrogates needed, S utility-only steps per item
    AdversarialFineTuning(epochs=1, mitigation_loss=False, dori_steps=1)(
        tiny, items, utility=utility, log=seen.append
    )
    steps = [r for r in seen if r["kind"] == "step"]
    assert seen[0]["skipped"] == {} and seen[-1]["dori_final_loss"] is None
    assert len(steps) == 6 and all(r["l_adv"] is None and r["l_util"] is not None for r in steps)
    seen.clear()
    # "No Utility Loss" + "One Step"; the item without surrogates is skipped with its reason
    AdversarialFineTuning(epochs=1, utility_loss=False, steps_per_embedding=1, dori_steps=1)(
        tiny, items, surrogates=surr, log=seen.append
    )
    steps = [r for r in seen if r["kind"] == "step"]
    assert seen[0]["skipped"] == {"m1": "replicas only"}
    assert len(steps) == 1 and steps[0]["l_util"] is None and steps[0]["l_adv"] > 0
    with pytest.raises(DoriError):
        AdversarialFineTuning(utility_loss=False, mitigation_loss=False)
    with pytest.raises(DoriError, match="non-memorized"):
        AdversarialFineTuning(epochs=1)(tiny, items, surrogates=surr)


def test_lora_starts_as_identity_trains_and_merges(tiny):
    import copy

    unet = copy.deepcopy(tiny.unet)
    names = lora.add_lora(unet, rank=4, convs=True)
    assert any("conv" in n for n in names) and any("attn2.to_k" in n for n in names)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    emb = torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, emb).sample, tiny.unet(x, t, emb).sample)
    params = lora.lora_parameters(unet)
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in unet.parameters()) == len(params)
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.zeros(2, 4, 8, 8)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (unet(x, t, emb).sample - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        wrapped = unet(x, t, emb).sample
        state = lora.lora_state_dict(unet)
        assert lora.merge_lora(unet) == len(names)
        torch.testing.assert_close(unet(x, t, emb).sample, wrapped, atol=1e-5, rtol=1e-4)
    assert not lora.lora_modules(unet) and len(state) == 2 * len(names)


def test_advft_lora_changes_only_wrapped_layers(tiny):
    items = _items(1, 0, "m")
    out = AdversarialFineTuning(
        epochs=1, steps_per_embedding=1, dori_steps=1, utility_loss=False, lora_rank=4, lr=1e-3
    )(tiny, items, surrogates=_surrogates(items))
    changed = changed_parameters(tiny.unet, out.unet)
    assert changed and all(n.endswith(".weight") for n in changed)
    assert not any("norm" in n for n in changed)
    assert not any(n.startswith(("conv_in", "conv_out")) or "resnets" in n and "conv" in n for n in changed)


def test_surrogates_reject_replicas_and_round_trip(tiny, tmp_path):
    items = _items(2, 4, "m")
    sim = copy_similarity(lambda im: im.flatten(1))
    # threshold above every cosine of random images: all candidates kept; at -1: all are "replicas"
    s = generate_surrogates(tiny, items, sim, threshold=1.01, per_item=2, max_rounds=1, config=_fast())
    assert {k: v.shape[0] for k, v in s.images.items()} == {"m0": 2, "m1": 2}
    none = generate_surrogates(tiny, items[:1], sim, threshold=-1.0, per_item=2, max_rounds=2, config=_fast())
    assert not none.images and "replicas" in none.failed["m0"]
    calls = []

    def mitigation(model, ids):
        import contextlib

        calls.append(list(ids))
        return contextlib.nullcontext()

    generate_surrogates(
        tiny, items, sim, 1.01, mitigation=mitigation, per_item=1, max_rounds=1, config=_fast()
    )
    assert calls == [["m0"], ["m1"]]
    s.save(tmp_path / "surr")
    back = load_surrogates(tmp_path / "surr", items + _items(1, 0, "x"), size=16)
    assert back.images["m0"].shape == (2, 3, 16, 16) and "x0" in back.failed
    torch.testing.assert_close(back.images["m1"], s.images["m1"], atol=1 / 255, rtol=0)


def _fast():
    from dori.models.pipeline import SamplingConfig

    return SamplingConfig(steps=2, guidance=2.0)


def test_noise_draws_set_the_update_batch(tiny, monkeypatch):
    items, utility = _items(1, 3, "m"), _items(4, 4, "u")
    surr = _surrogates(items)
    sizes = []
    original = type(tiny).training_loss

    def recording(self, x0, emb, t, noise):
        sizes.append((x0.shape[0], emb.shape[0], t.shape[0]))
        return original(self, x0, emb, t, noise)

    monkeypatch.setattr(type(tiny), "training_loss", recording)
    common = dict(
        epochs=1,
        steps_per_embedding=1,
        dori_steps=0,
        init_schedule="prompt",
        embeddings_per_item=2,
        persistent=0,
        utility_target="data",  # the recorded loss: with the teacher target the update computes it inline
    )
    AdversarialFineTuning(**common, noise_draws=3, utility_batch=None)(
        tiny, items, surrogates=surr, utility=utility
    )
    AdversarialFineTuning(**common, noise_draws=3, utility_batch=5)(
        tiny, items, surrogates=surr, utility=utility
    )
    AdversarialFineTuning(**common, noise_draws=1, utility_batch=None)(
        tiny, items, surrogates=surr, utility=utility
    )
    # 2 embeddings x 3 draws adversarial samples, then as many utility pairs (or utility_batch)
    assert sizes == [(12, 12, 12), (11, 11, 11), (4, 4, 4)]
    with pytest.raises(DoriError, match="noise_draws"):
        AdversarialFineTuning(noise_draws=0)


def test_utility_weight_scales_the_utility_gradient(tiny):
    items, utility = _items(1, 2, "m"), _items(4, 4, "u")
    norms = {}
    for w in (1.0, 3.0):
        logs = []
        AdversarialFineTuning(
            epochs=1, steps_per_embedding=1, mitigation_loss=False, grad_clip=None, utility_weight=w
        )(tiny, items, utility=utility, log=logs.append)
        norms[w] = next(r["grad_norm"] for r in logs if r["kind"] == "step")
    # same draws, the first update's gradient is lambda * grad L_DM
    assert norms[3.0] == pytest.approx(3.0 * norms[1.0], rel=1e-4)
    with pytest.raises(DoriError, match="utility_weight"):
        AdversarialFineTuning(utility_weight=0.0)


def test_stop_mr_ends_at_the_first_epoch_whose_dori_no_longer_replicates(tiny, tmp_path):
    items, utility = _items(2, 7, "m"), _items(4, 8, "u")
    surr = _surrogates(items)
    common = dict(steps_per_embedding=1, dori_steps=2, utility_batch=2, noise_draws=1, stop_generations=2)
    never = lambda gen, ref: torch.zeros(gen.shape[0])  # noqa: E731  (no generation is a replica)
    always = lambda gen, ref: torch.ones(gen.shape[0])  # noqa: E731
    kw = dict(surrogates=surr, utility=utility, sampling=_fast())

    logs = []
    stopped = AdversarialFineTuning(epochs=3, stop_mr=0.0, **common)(
        tiny, items, tmp_path / "stop", log=logs.append, similarity=never, threshold=0.5, **kw
    )
    checks = [r for r in logs if r["kind"] == "check"]
    assert [(r["epoch"], r["mr"]) for r in checks] == [(2, 0.0)]
    assert [r["epoch"] for r in logs if r["kind"] == "epoch"] == [1]
    record = json.loads((tmp_path / "stop" / "finetune.json").read_text())
    assert record["epochs_done"] == 1 and record["stopped_early"] is True
    # the model kept is the one after epoch 1: the same weights as a one-epoch run
    one = AdversarialFineTuning(epochs=1, **common)(tiny, items, **kw)
    assert not changed_parameters(one.unet, stopped.unet)

    logs = []
    AdversarialFineTuning(epochs=3, stop_mr=0.0, **common)(
        tiny, items, log=logs.append, similarity=always, threshold=0.5, **kw
    )
    assert [(r["epoch"], r["mr"]) for r in logs if r["kind"] == "check"] == [(2, 1.0), (3, 1.0)]
    assert [r["epoch"] for r in logs if r["kind"] == "epoch"] == [1, 2, 3]
    with pytest.raises(DoriError, match="similarity"):
        AdversarialFineTuning(epochs=2, stop_mr=0.1, **common)(tiny, items, **kw)
    with pytest.raises(DoriError, match="stop_mr"):
        AdversarialFineTuning(stop_mr=1.0)


def test_init_schedule_both_searches_from_the_prompt_and_from_noise_every_epoch(tiny, monkeypatch):
    import dori.mitigations.adversarial_ft as adv

    items = _items(2, 3, "m")
    seen = []
    original = adv.initial_embeddings

    def recording(model, prompts, init="prompt", seeds=None, **kw):
        out = original(model, prompts, init=init, seeds=seeds, **kw)
        seen.append((init, len(prompts)))
        return out

    monkeypatch.setattr(adv, "initial_embeddings", recording)
    assert AdversarialFineTuning().init_schedule == "both"  # the default
    ft = AdversarialFineTuning(
        epochs=2, steps_per_embedding=1, dori_steps=0, utility_loss=False, embeddings_per_item=2, persistent=0
    )
    y, _ = ft._search(tiny, adv._Data.build(tiny, items, _surrogates(items), []), 1, torch.Generator())
    # 2 items x 2 embeddings: rows 0 and 2 from the prompts, rows 1 and 3 from N(0, I)
    prompt_emb = tiny.encode_text([it.prompt for it in items]).float()
    assert torch.allclose(y[0], prompt_emb[0]) and torch.allclose(y[2], prompt_emb[1])
    assert not torch.allclose(y[1], prompt_emb[0]) and not torch.allclose(y[3], prompt_emb[1])
    assert ("random", 4) in seen and ("prompt", 2) in seen
    with pytest.raises(DoriError, match="both"):
        AdversarialFineTuning(init_schedule="both", embeddings_per_item=1)


def test_persistent_embeddings_continue_the_previous_search_and_survive_a_resume(tiny, tmp_path, monkeypatch):
    """With ``persistent=1`` the last embedding of each item starts epoch e where epoch e-1's search ended
    (read back from the checkpoint after a resume); the other embeddings start afresh from their inits."""
    import dori.mitigations.adversarial_ft as adv

    items, utility = _items(2, 4, "m"), _items(3, 2, "u")
    surr = _surrogates(items)
    starts, ends = [], []
    original = adv.Dori.__call__

    def recording(self, model, targets, init, seeds, **kw):
        res = original(self, model, targets, init, seeds, **kw)
        starts.append(init.clone())
        ends.append(res.embeddings.detach().cpu().clone())
        return res

    monkeypatch.setattr(adv.Dori, "__call__", recording)
    cfg = dict(
        embeddings_per_item=3, persistent=1, steps_per_embedding=1, dori_steps=2, utility_batch=2, seed=1
    )
    AdversarialFineTuning(epochs=1, **cfg)(tiny, items, tmp_path / "p", surrogates=surr, utility=utility)
    AdversarialFineTuning(epochs=2, **cfg)(tiny, items, tmp_path / "p", surrogates=surr, utility=utility)
    assert len(starts) == 2  # epoch 1 in the first call, epoch 2 after the resume
    prompt_emb = tiny.encode_text([it.prompt for it in items]).float()
    for i in range(2):  # rows 3i, 3i+1, 3i+2: prompt, random, persistent
        assert torch.equal(starts[1][3 * i + 2], ends[0][3 * i + 2])  # continued across the resume
        assert torch.allclose(starts[1][3 * i], prompt_emb[i])  # fresh from the prompt
        assert not torch.equal(starts[1][3 * i + 2], starts[0][3 * i + 2])
    with pytest.raises(DoriError, match="fresh"):
        AdversarialFineTuning(embeddings_per_item=2, persistent=1)  # "both" needs two fresh searches


def test_uncond_share_trains_the_empty_prompt_on_utility_images(tiny, monkeypatch):
    """Caption dropout: with ``uncond_share`` about that share of the utility rows carry the empty prompt's
    embedding; with 0 none do. Both utility targets (the teacher sees the same rows as the trained model)."""
    items, utility = _items(1, 5, "m"), _items(40, 6, "u")
    null = tiny.null_embedding().float()[0]
    original = type(tiny).unet_forward
    for target in ("data", "teacher"):
        shares = {}
        for share in (0.0, 0.5):
            rows = []

            def recording(self, x_t, t, emb, *args, _rows=rows, **kwargs):
                _rows.append(emb.detach().float().cpu())
                return original(self, x_t, t, emb, *args, **kwargs)

            monkeypatch.setattr(type(tiny), "unet_forward", recording)
            ft = AdversarialFineTuning(
                epochs=2, steps_per_embedding=4, dori_steps=0, utility_batch=64, mitigation_loss=False,
                uncond_share=share, init_schedule="prompt", embeddings_per_item=1, persistent=0,
                utility_target=target,
            )  # fmt: skip
            ft(tiny, items, utility=utility)
            monkeypatch.setattr(type(tiny), "unet_forward", original)
            util = torch.cat(rows)
            assert util.shape[0] == 2 * 4 * 64 * (2 if target == "teacher" else 1)
            shares[share] = float((util - null).abs().amax(dim=(1, 2)).lt(1e-6).float().mean())
        assert shares[0.0] == 0.0
        assert 0.35 < shares[0.5] < 0.65
    with pytest.raises(DoriError, match="uncond_share"):
        AdversarialFineTuning(uncond_share=1.0)


def test_ema_returns_the_average_of_the_trained_weights_and_survives_a_resume(tiny, tmp_path):
    """After one update w1 from w0, ``ema=d`` returns d * w0 + (1 - d) * w1 (same draws as without EMA); a run
    resumed from its epoch-1 checkpoint returns the same average as one never interrupted."""
    items, utility = _items(1, 1, "m"), _items(3, 2, "u")
    surr = _surrogates(items)
    one = dict(
        epochs=1, steps_per_embedding=1, dori_steps=1, utility_batch=2, lr=1e-3, grad_clip=None, seed=2
    )
    plain = AdversarialFineTuning(**one)(tiny, items, surrogates=surr, utility=utility)
    averaged = AdversarialFineTuning(**one, ema=0.75)(tiny, items, surrogates=surr, utility=utility)
    moved = 0
    for w0, w1, avg in zip(
        tiny.unet.parameters(), plain.unet.parameters(), averaged.unet.parameters(), strict=True
    ):
        torch.testing.assert_close(avg, 0.75 * w0 + 0.25 * w1, rtol=0, atol=1e-7)
        moved += int(not torch.equal(w0, w1))
    assert moved > 0

    cfg = dict(one, steps_per_embedding=2, ema=0.9)
    full = AdversarialFineTuning(**dict(cfg, epochs=2))(
        tiny, items, tmp_path / "a", surrogates=surr, utility=utility
    )
    AdversarialFineTuning(**cfg)(tiny, items, tmp_path / "b", surrogates=surr, utility=utility)
    resumed = AdversarialFineTuning(**dict(cfg, epochs=2))(
        tiny, items, tmp_path / "b", surrogates=surr, utility=utility
    )
    for p, q in zip(full.unet.parameters(), resumed.unet.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    with pytest.raises(DoriError, match="ema"):
        AdversarialFineTuning(ema=1.0)


def test_cosine_schedule_lowers_the_learning_rate_epoch_by_epoch(tiny):
    ft = AdversarialFineTuning(epochs=4, lr=1e-4, lr_schedule="cosine")
    assert [round(ft.lr_for_epoch(e) / 1e-4, 6) for e in (1, 2, 3, 4)] == [1.0, 0.853553, 0.5, 0.146447]
    assert AdversarialFineTuning(epochs=4, lr=1e-4).lr_for_epoch(4) == 1e-4
    # the optimizer trains at that rate: epoch 2's first update of a 2-epoch cosine run moves the weights less
    # than the same update at the constant rate would
    items, utility = _items(1, 3, "m"), _items(2, 2, "u")
    surr = _surrogates(items)
    cfg = dict(
        epochs=2, steps_per_embedding=1, dori_steps=1, utility_batch=2, lr=1e-3, grad_clip=None, seed=1
    )
    const = AdversarialFineTuning(**cfg)(tiny, items, surrogates=surr, utility=utility)
    cos = AdversarialFineTuning(**cfg, lr_schedule="cosine")(tiny, items, surrogates=surr, utility=utility)

    def moved(m):
        return sum(
            float((p - q).abs().sum())
            for p, q in zip(tiny.unet.parameters(), m.unet.parameters(), strict=True)
        )

    d_const, d_cos = moved(const), moved(cos)
    assert d_cos < d_const  # epoch 2 ran at lr / 2
    with pytest.raises(DoriError, match="lr_schedule"):
        AdversarialFineTuning(lr_schedule="linear")


def test_teacher_utility_target_starts_at_zero_and_pulls_back_toward_the_unmitigated_model(tiny):
    """With ``utility_target="teacher"`` the utility loss compares the prediction with the unmitigated model's
    on the same noisy utility latents: zero (and no gradient) before any update, and after updates that moved the
    weights it pulls them back, where L_DM against the drawn noise does not."""
    items, utility = _items(1, 5, "m"), _items(4, 6, "u")
    surr = _surrogates(items)
    logs = []
    AdversarialFineTuning(
        epochs=1, steps_per_embedding=1, mitigation_loss=False, grad_clip=None, weight_decay=0.0,
        utility_target="teacher", utility_batch=4,
    )(tiny, items, utility=utility, log=logs.append)  # fmt: skip
    step = next(r for r in logs if r["kind"] == "step")
    assert step["l_util"] == 0.0 and step["grad_norm"] == 0.0
    data_logs = []
    AdversarialFineTuning(
        epochs=1,
        steps_per_embedding=1,
        mitigation_loss=False,
        grad_clip=None,
        weight_decay=0.0,
        utility_batch=4,
        utility_target="data",
    )(tiny, items, utility=utility, log=data_logs.append)
    assert next(r for r in data_logs if r["kind"] == "step")["l_util"] > 0.0  # L_DM is not zero at the start

    def distance(m):
        return sum(
            float((p - q).pow(2).sum())
            for p, q in zip(tiny.unet.parameters(), m.unet.parameters(), strict=True)
        )

    cfg = dict(
        epochs=2, steps_per_embedding=2, dori_steps=1, utility_batch=4, lr=1e-3, seed=2, utility_weight=50.0
    )
    pulled = AdversarialFineTuning(**cfg, utility_target="teacher")(
        tiny, items, surrogates=surr, utility=utility
    )
    free = AdversarialFineTuning(**cfg, utility_target="data")(tiny, items, surrogates=surr, utility=utility)
    assert 0.0 < distance(pulled) < distance(free)
    with pytest.raises(DoriError, match="utility_target"):
        AdversarialFineTuning(utility_target="model")


def test_guided_distillation_weighs_the_guidance_direction_w_fold():
    """The per-pair loss is |d_c|^2 + |d_g / w|^2 with d_g = d_u + w (d_c - d_u): a shift the caption and the
    empty prompt share costs about what the teacher target's |d_c|^2 costs (1 + 1/w^2 times), opposite differences
    (what guidance amplifies) 1 + (2 - 1/w)^2 times: 4.4 at w = 7."""
    g = torch.Generator().manual_seed(0)
    d_c, d_u = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    w = 7.0
    d_g = d_u + w * (d_c - d_u)
    expected = d_c.pow(2).mean((1, 2, 3)) + (d_g / w).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(guided_distillation(torch.cat([d_c, d_u]), 3, w), expected)
    shift = torch.ones(1, 4, 8, 8)
    assert float(guided_distillation(torch.cat([shift, shift]), 1, w)) == pytest.approx(1 + 1 / w**2)
    split = torch.cat([shift, -shift])  # d_c = -d_u: the guided difference is (2w - 1) |shift|
    assert float(guided_distillation(split, 1, w)) == pytest.approx(1 + (2 - 1 / w) ** 2)
    assert float(guided_distillation(split, 1, 1.0)) == pytest.approx(2.0)  # w = 1: the caption's twice


def test_guided_utility_target_starts_at_zero_and_keeps_the_guided_prediction_closer(tiny, monkeypatch):
    """``utility_target="guided"``: every utility pair is predicted again with the empty prompt (by the trained
    model and the unmitigated one), the loss is zero before any update, and after updates that the adversarial
    loss drives, the guided prediction on utility latents stays closer to the unmitigated model's than with the
    teacher target (same draws, same weights)."""
    items, utility = _items(1, 5, "m"), _items(4, 6, "u")
    null = tiny.null_embedding().float()[0]
    rows, original = [], type(tiny).unet_forward

    def recording(self, x_t, t, emb, *args, **kwargs):
        rows.append(emb.detach().float().cpu())
        return original(self, x_t, t, emb, *args, **kwargs)

    monkeypatch.setattr(type(tiny), "unet_forward", recording)
    logs = []
    AdversarialFineTuning(
        epochs=1, steps_per_embedding=1, mitigation_loss=False, grad_clip=None, weight_decay=0.0,
        utility_target="guided", utility_batch=4, uncond_share=0.0,
    )(tiny, items, utility=utility, log=logs.append)  # fmt: skip
    monkeypatch.setattr(type(tiny), "unet_forward", original)
    step = next(r for r in logs if r["kind"] == "step")
    assert step["l_util"] == 0.0 and step["grad_norm"] == 0.0
    # the trained model's rows, then the teacher's: 4 captions + 4 empty prompts each
    first = torch.cat(rows[:2])
    assert first.shape[0] == 16
    is_null = (first - null).abs().amax(dim=(1, 2)).lt(1e-6)
    assert is_null.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4

    surr = _surrogates(items)
    cfg = dict(
        epochs=2, steps_per_embedding=3, dori_steps=2, utility_batch=8, lr=2e-3, seed=3, uncond_share=0.0
    )
    models = {
        target: AdversarialFineTuning(**cfg, utility_target=target)(
            tiny, items, surrogates=surr, utility=utility
        )
        for target in ("teacher", "guided")
    }
    x0 = torch.stack([it.image for it in utility]).to(torch.float32)
    lat = tiny.encode_images(x0)
    gen = torch.Generator().manual_seed(9)
    noise = torch.randn(lat.shape, generator=gen)
    t = torch.randint(0, tiny.num_train_timesteps, (lat.shape[0],), generator=gen)
    x_t = tiny.add_noise(lat, noise, t)
    c = tiny.encode_text([it.prompt for it in utility])
    u = tiny.null_embedding().expand_as(c)

    def guided(m):
        with torch.no_grad():
            e_c, e_u = m.unet_forward(x_t, t, c), m.unet_forward(x_t, t, u)
        return e_u + 7.0 * (e_c - e_u)

    ref = guided(tiny)
    drift = {k: float((guided(m) - ref).pow(2).mean()) for k, m in models.items()}
    assert 0.0 < drift["guided"] < drift["teacher"]
    with pytest.raises(DoriError, match="utility_guidance"):
        AdversarialFineTuning(utility_target="guided", utility_guidance=0.5)


@pytest.mark.parametrize("target", ["data", "teacher"])
def test_adv_min_timestep_draws_only_the_mitigation_rows_above_it(tiny, monkeypatch, target):
    items, utility = _items(1, 3, "m"), _items(4, 4, "u")
    surr = _surrogates(items)
    seen = []  # t of every UNet pass with gradients (the student's; the teacher runs without)
    original = type(tiny).unet_forward

    def recording(self, x_t, t, emb):
        if torch.is_grad_enabled():
            seen.append(t.cpu())
        return original(self, x_t, t, emb)

    monkeypatch.setattr(type(tiny), "unet_forward", recording)
    common = dict(
        epochs=1, steps_per_embedding=2, dori_steps=0, init_schedule="prompt", embeddings_per_item=2,
        persistent=0, noise_draws=16, utility_batch=32, utility_target=target,
    )  # fmt: skip
    AdversarialFineTuning(**common, adv_min_timestep=700)(tiny, items, surrogates=surr, utility=utility)
    assert [t.numel() for t in seen] == [32 + 32, 32 + 32]  # 2 embeddings x 16 draws, then 32 utility pairs
    adv, util = torch.cat([t[:32] for t in seen]), torch.cat([t[32:] for t in seen])
    assert int(adv.min()) >= 700 and int(adv.max()) < tiny.num_train_timesteps
    # the utility rows keep the whole range (64 uniform draws all >= 700: probability 0.3^64, about 3e-34)
    assert int(util.min()) < 700
    with pytest.raises(DoriError, match="adv_min_timestep"):
        AdversarialFineTuning(adv_min_timestep=-1)
    with pytest.raises(DoriError, match="leaves no timestep"):
        AdversarialFineTuning(**common, adv_min_timestep=tiny.num_train_timesteps)(
            tiny, items, surrogates=surr, utility=utility
        )
