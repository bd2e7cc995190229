import torch

from dori.attacks.dori import Dori, initial_embeddings


def test_search_lowers_loss_and_changes_embedding(tiny):
    x0 = tiny.encode_images(torch.rand(2, 3, 16, 16))
    init = initial_embeddings(tiny, ["a red circle", "blue square"])
    res = Dori(steps=30, lr=0.1, batch_size=8, snapshot_steps=(1, 30))(tiny, x0, init, seeds=[0, 1])
    assert res.embeddings.shape == init.shape
    assert res.losses.shape == (2, 30)
    assert not torch.allclose(res.embeddings, init)
    assert (res.losses[:, -10:].mean(1) < res.losses[:, :3].mean(1)).all()
    torch.testing.assert_close(res.snapshots[30], res.embeddings)
    assert all(p.requires_grad is False for p in tiny.unet.parameters())


def test_batched_equals_one_at_a_time(tiny):
    x0 = tiny.encode_images(torch.rand(3, 3, 16, 16))
    init = initial_embeddings(tiny, ["a", "b", "c"], init="random", seeds=[4, 5, 6])
    dori = Dori(steps=5)
    together = dori(tiny, x0, init, seeds=[4, 5, 6]).embeddings
    alone = dori(tiny, x0[1:2], init[1:2], seeds=[5]).embeddings
    torch.testing.assert_close(together[1:2], alone, atol=1e-4, rtol=1e-4)
    chunked = Dori(steps=5, max_micro_batch=8)(tiny, x0, init, seeds=[4, 5, 6]).embeddings
    torch.testing.assert_close(together, chunked, atol=1e-4, rtol=1e-4)


def test_seed_determinism_and_norm_ball(tiny):
    x0 = tiny.encode_images(torch.rand(1, 3, 16, 16))
    init = initial_embeddings(tiny, ["x"])
    a = Dori(steps=3)(tiny, x0, init, [7]).embeddings
    b = Dori(steps=3)(tiny, x0, init, [7]).embeddings
    c = Dori(steps=3)(tiny, x0, init, [8]).embeddings
    assert torch.equal(a, b) and not torch.equal(a, c)
    r = float(init.norm()) * 0.5
    d = Dori(steps=3, norm_ball=r)(tiny, x0, init, [7])
    assert d.embeddings.flatten(1).norm(dim=1).max() <= r * 1.0001
