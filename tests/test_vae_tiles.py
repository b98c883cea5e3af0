import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from k5.engine.vae.video import VideoVAE
from k5.parallel.vae_tiles import Tile, assign_tiles, broadcast_image_latent, parallel_decode, plan_tiles
from test_vae import SMALL_TILES, tiny_vae

# Non-square, 4 temporal windows ([0:4], [2:6], [4:7] and a last one-frame window [6:7] whose only decoded frame
# is dropped: the library does that too) x 2 rows x 3 columns (the last 1 latent pixel wide) = 24 tiles.
VIDEO = (1, 7, 5, 7, 16)
SPATIAL_ONLY = (1, 3, 5, 7, 16)  # 3 latent frames: one window, so `tiled_decode` alone
ONE_TILE = (1, 2, 3, 4, 16)  # fits in one tile: fewer tiles than ranks


def make(shape, seed):
    vae = VideoVAE(tiny_vae(), **SMALL_TILES).vae
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return vae, latents


def reference(vae, latents, fn):
    with torch.no_grad():
        return fn(latents.permute(0, 4, 1, 2, 3) / vae.config.scaling_factor).sample


def test_plan_is_the_library_tiling():
    vae, latents = make(VIDEO, 0)
    seen = []
    hook = vae.post_quant_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    reference(vae, latents, vae.decode)
    hook.remove()
    tiles = plan_tiles(latents.shape, vae)
    assert len(tiles) == len(seen) == 24
    assert {t.window for t in tiles} == {0, 1, 2, 3} and {(t.row, t.col) for t in tiles} == {
        (i, j) for i in range(2) for j in range(3)
    }
    z = latents.permute(0, 4, 1, 2, 3) / vae.config.scaling_factor
    for tile, x in zip(tiles, seen):  # same slices, same order as the library's decoder calls
        assert torch.equal(z[:, :, tile.t[0] : tile.t[1], tile.h[0] : tile.h[1], tile.w[0] : tile.w[1]], x)
    # Cost = decoded frames (after the first-frame drop) x latent pixels: edge tiles cost less.
    first = tiles[0]
    assert first.cost == 13 * 4 * 4 and tiles[2].cost == 13 * 4 * 1 and tiles[-1].cost == 0
    assert plan_tiles(latents.shape, vae) == tiles


def test_plan_without_tiling_is_one_tile():
    vae = tiny_vae()  # library defaults: tiling off, temporal windows of 4+1 latent frames
    assert [(t.t, t.h, t.w) for t in plan_tiles((4, 40, 56), vae)] == [((0, 4), (0, 40), (0, 56))]
    assert [t.t for t in plan_tiles((7, 5, 7), vae)] == [(0, 5), (3, 7), (6, 7)]


def fake(costs):
    return [Tile(i, 0, 0, i, (0, 1), (0, 1), (0, 1), False, c) for i, c in enumerate(costs)]


def test_assign_tiles_lpt_by_hand():
    # LPT on costs 7 5 4 3 3 2: 7->r0, 5->r1, 4->r1 (9), 3->r0 (10), 3->r1 (12), 2->r0 (12)
    assert assign_tiles(fake([7, 5, 4, 3, 3, 2]), 2) == [[0, 3, 5], [1, 2, 4]]
    # ties go to the lower index and the lower rank
    assert assign_tiles(fake([1, 1, 1, 1]), 3) == [[0, 3], [1], [2]]
    assert assign_tiles(fake([5]), 4) == [[0], [], [], []]
    with pytest.raises(ValueError):
        assign_tiles(fake([1]), 0)


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_assign_tiles_balances_work(world):
    vae, latents = make(VIDEO, 0)
    tiles = plan_tiles(latents.shape, vae)
    owned = assign_tiles(tiles, world)
    assert sorted(i for ids in owned for i in ids) == list(range(len(tiles)))
    load = [sum(tiles[i].cost for i in ids) for ids in owned]
    round_robin = [sum(t.cost for t in tiles[r::world]) for r in range(world)]
    assert max(load) <= max(round_robin)
    # LPT bound: the heaviest rank exceeds the mean by at most one tile
    assert max(load) <= sum(load) / world + max(t.cost for t in tiles)


# Sub-groups of one 4-process gloo run: spawning a process costs ~5 s of imports on 2 cores, so the 1-, 2-, 3- and
# 4-rank decodes share one start. The groups are chosen so that group ranks differ from global ranks, and `dst` is
# a group rank (not always 0).
GROUPS = [([2], 0), ([1, 3], 1), ([0, 2, 3], 2), ([0, 1, 2, 3], 0)]


def worker(rank, world):
    groups = [dist.new_group(ranks) for ranks, _ in GROUPS]  # collective: every rank creates every group
    results = []
    for (ranks, dst), group in zip(GROUPS, groups):
        if rank not in ranks:
            results.append(None)
            continue
        out = {}
        for name, shape, seed in (("video", VIDEO, 1), ("spatial", SPATIAL_ONLY, 2), ("one", ONE_TILE, 3)):
            vae, latents = make(shape, seed)
            counted = []
            hook = vae.post_quant_conv.register_forward_pre_hook(lambda m, args: counted.append(args[0].clone()))
            frames, stats = parallel_decode(vae, latents, group=group, dst=dst, to_uint8=False)
            hook.remove()
            out[name] = dict(frames=frames, stats=stats, plan=plan_tiles(latents.shape, vae), inputs=counted)
        vae, latents = make(VIDEO, 1)
        out["uint8_all"], _ = parallel_decode(vae, latents, group=group, dst=None)
        src = len(ranks) - 1
        image = torch.randn(1, 1, 3, 4, 16) if dist.get_rank(group) == src else None
        out["image"] = broadcast_image_latent(image, group=group, src=src)
        out["group_rank"] = dist.get_rank(group)
        results.append(out)
    return results


def test_parallel_decode_equals_library_tiled_decode():
    all_results = run_distributed(worker, 4)
    refs = {}
    for name, shape, seed, fn in (
        ("video", VIDEO, 1, "_temporal_tiled_decode"),
        ("spatial", SPATIAL_ONLY, 2, "tiled_decode"),
        ("one", ONE_TILE, 3, "decode"),
    ):
        vae, latents = make(shape, seed)
        z = latents.permute(0, 4, 1, 2, 3) / vae.config.scaling_factor
        refs[name] = (reference(vae, latents, getattr(vae, fn)), plan_tiles(latents.shape, vae), z)
    vae, latents = make(VIDEO, 1)
    ref_frames = VideoVAE(vae, **SMALL_TILES).decode(latents)

    for g, (ranks, dst) in enumerate(GROUPS):
        world = len(ranks)
        results = [all_results[r][g] for r in ranks]
        assert [res["group_rank"] for res in results] == list(range(world))
        assert all(all_results[r][g] is None for r in range(4) if r not in ranks)
        for name, (ref, plan, z) in refs.items():
            owned = assign_tiles(plan, world)
            for rank, res in enumerate(results):
                r = res[name]
                assert r["plan"] == plan  # every rank planned the same tiles without talking
                assert r["stats"].tiles == owned[rank] and r["stats"].world_size == world
                # this rank called the decoder exactly on its planned tiles, in order, and on nothing else
                expected = [z[:, :, t.t[0] : t.t[1], t.h[0] : t.h[1], t.w[0] : t.w[1]] for t in plan if t.index in owned[rank]]
                assert len(r["inputs"]) == len(expected)
                assert all(torch.equal(a, b) for a, b in zip(r["inputs"], expected))
                assert r["stats"].peak_kind == "cpu_tile_buffers" and r["stats"].peak_bytes > 0
                if rank == dst:
                    assert r["stats"].blended and r["frames"].shape == ref.shape
                    assert (r["frames"] - ref).abs().max().item() <= 1e-4, (g, name)
                else:
                    assert r["frames"] is None and not r["stats"].blended
            if name == "one" and world > 1:
                assert sum(bool(ids) for ids in owned) == 1  # the other ranks were idle but took part
            if name == "video":
                assert all(res[name]["inputs"] for res in results)  # 24 tiles: every rank had work
        for res in results:
            assert torch.equal(res["uint8_all"], ref_frames)  # dst=None: every rank has the frames
            assert torch.equal(res["image"], results[-1]["image"])


def test_single_process_without_distributed():
    vae, latents = make(SPATIAL_ONLY, 5)
    frames, stats = parallel_decode(vae, latents)
    assert stats.world_size == 1 and stats.tiles == list(range(stats.num_tiles)) and stats.num_tiles == 6
    # Bitwise: the library's per-tile calls on the same slices of the same tensor, and an elementwise blend.
    assert torch.equal(frames, VideoVAE(vae, **SMALL_TILES).decode(latents))
    assert "6/6 tiles" in stats.summary()
    # CPU peak = packed tiles + assembled video, fp32. Tiles: 9 frames x (32 + 16 px rows) x (32 + 32 + 8 px cols)
    # x 3 channels; video: 9 x 40 x 56 x 3.
    assert stats.peak_bytes == (9 * 48 * 72 * 3 + 9 * 40 * 56 * 3) * 4
    with pytest.raises(ValueError, match="dst=1"):
        parallel_decode(vae, latents, dst=1)
