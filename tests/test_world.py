"""The world generator (determinism, variety, geometry helpers) and the tiny VLM's dense
visual-token targets."""
import torch

from specvlm_core import tiny_vlm, world


def test_object_at_finds_the_drawn_object_and_nothing_else():
    large = world.WorldObject("circle", "red", "large", 4)
    small = world.WorldObject("star", "blue", "small", 0)
    img = world.render([large, small], 90, 90)
    assert world.object_at([large, small], 0.5, 0.5) == large
    assert world.object_at([large, small], 1 / 6, 1 / 6) == small
    # A small object's cell corner is background; the pixel there is the background too.
    assert world.object_at([large, small], 0.02, 0.02) is None
    assert img.getpixel((2, 2)) == (200, 200, 200)
    assert img.getpixel((45, 45)) == world.COLOURS["red"]


def test_object_extent_follows_the_aspect_ratio():
    wide = world.WorldObject("square", "green", "large", 4)
    # On a 2:1 canvas the radius is a fraction of the cell height, so in x it is half as wide.
    assert world.object_at([wide], 0.5 + 0.42 / 3 * 0.45, 0.5, aspect=2.0) == wide
    assert world.object_at([wide], 0.5 + 0.42 / 3 * 0.6, 0.5, aspect=2.0) is None
    assert world.object_at([wide], 0.5, 0.5 + 0.42 / 3 * 0.9, aspect=2.0) == wide


def test_visual_token_targets_label_the_tokens_an_object_covers():
    obj = world.WorldObject("heart", "yellow", "large", 8)
    sample = world.Sample("image", [world.render([obj], 96, 96)], "q", "a", "describe", (obj,))
    grid = torch.tensor([[1, 12, 12]])  # 12x12 patches -> 6x6 merged tokens
    targets = tiny_vlm.visual_token_targets([sample], grid)
    assert targets.shape == (36, 4)
    assert targets[0, 3] == 0 and targets[35, 3] == 8 and targets[3, 3] == 1  # grid cells
    labelled = targets[:, 0].nonzero().flatten().tolist()
    # Only tokens of the bottom-right 2x2 cell block are labelled, in row-major order.
    assert labelled and all(i // 6 >= 4 and i % 6 >= 4 for i in labelled)
    expected = (list(world.COLOURS).index("yellow") + 1, world.SHAPES.index("heart") + 1, 2)
    assert tuple(targets[labelled[0]].tolist()[:3]) == expected


def test_clip_targets_follow_the_frames():
    sample = next(s for s in (world.make_sample(i, kind="video", n_frames=4) for i in range(50))
                  if s.events[0].kind == "recolour")
    grid = torch.tensor([[2, 6, 6]])  # two temporal groups of 3x3 tokens
    targets = tiny_vlm.visual_token_targets([sample], grid)
    before, after = targets[:9, 0], targets[9:, 0]
    changed = list(world.COLOURS).index(sample.events[0].to_colour) + 1
    recoloured = sample.events[0].obj
    assert sample.events[0].frame == 2
    assert (list(world.COLOURS).index(recoloured.colour) + 1) in before.tolist()
    assert changed in after.tolist()


def test_change_targets_flag_the_tokens_that_differ_from_the_first_group():
    sample = next(s for s in (world.make_sample(i, kind="video", n_frames=4) for i in range(80))
                  if s.events[0].kind == "move")
    grid = torch.tensor([[2, 6, 6], [2, 6, 6]])  # the same clip twice: flags repeat per clip
    targets = tiny_vlm.visual_token_targets([sample, sample], grid)
    flags = tiny_vlm.change_targets(targets, grid)
    assert flags.shape == (36,)
    assert flags[:9].sum() == 0  # the first group never differs from itself
    moved = sample.events[0]
    changed_cells = {int(targets[9 + i, 3]) for i in flags[9:18].nonzero().flatten().tolist()}
    assert changed_cells == {moved.obj.cell, moved.to_cell}  # the old and the new place
    assert torch.equal(flags[:18], flags[18:])


def test_aux_loss_weighs_object_tokens_and_shape_accuracy_reads_the_head():
    head = torch.nn.Linear(4, sum(tiny_vlm.AUX_CLASSES))
    features = torch.randn(10, 4)
    background = torch.zeros(10, 4, dtype=torch.long)
    with_object = background.clone()
    with_object[0, :3] = torch.tensor([1, 2, 1])
    assert tiny_vlm.object_shape_accuracy(head, features, background) is None
    assert tiny_vlm.object_shape_accuracy(head, features, with_object) in (0.0, 1.0)
    # The object-only terms add to the plain mean: one object token among ten weighs more than 1/10.
    ce = torch.nn.functional.cross_entropy
    logits = head(features).split(tiny_vlm.AUX_CLASSES, dim=-1)
    plain_mean = sum(ce(lg, with_object[:, i]) for i, lg in enumerate(logits)) / 4
    extra = ce(logits[0][:1], with_object[:1, 0]) + ce(logits[1][:1], with_object[:1, 1]) + \
        0.5 * ce(logits[2][:1], with_object[:1, 2])
    assert torch.allclose(tiny_vlm.aux_visual_loss(head, features, with_object), plain_mean + extra)
    assert torch.allclose(tiny_vlm.aux_visual_loss(head, features, background),
                          sum(ce(lg, background[:, i]) for i, lg in enumerate(logits)) / 4)


def test_samples_are_deterministic_in_the_seed():
    for seed, kind in ((11, "image"), (12, "video")):
        a, b = world.make_sample(seed, kind=kind), world.make_sample(seed, kind=kind)
        assert (a.question, a.answer, a.task, a.objects, a.events) == (b.question, b.answer, b.task, b.objects, b.events)
        assert [f.tobytes() for f in a.frames] == [f.tobytes() for f in b.frames]
    assert world.make_sample(11, kind="image").answer != world.make_sample(13, kind="image").answer


def test_samples_vary_over_seeds():
    """Over a few hundred seeds every shape, colour, size, cell, object count, task,
    event kind and clip length turns up, at many resolutions and aspect ratios, and the
    descriptions use several phrasings."""
    images = [world.make_sample(i, kind="image", size_range=(64, 384)) for i in range(300)]
    clips = [world.make_sample(i, kind="video", video_size_range=(64, 96)) for i in range(120)]
    objects = [o for s in images for o in s.objects]
    assert {o.shape for o in objects} == set(world.SHAPES) and {o.colour for o in objects} == set(world.COLOURS)
    assert {o.size for o in objects} == set(world.SIZES) and {o.cell for o in objects} == set(range(9))
    assert {len(s.objects) for s in images} == set(range(1, 7))
    assert {s.task for s in images} == {"describe", "count", "colour", "position", "relation"}
    assert {s.task for s in clips} == {"describe", "motion"}
    assert {e.kind for s in clips for e in s.events} == {"move", "appear", "disappear", "recolour"}
    assert {len(s.frames) for s in clips} == {4, 6, 8, 12, 16}
    sizes = [max(s.frames[0].size) for s in images]
    assert min(sizes) < 80 and max(sizes) > 360
    assert len({round(s.frames[0].size[0] / s.frames[0].size[1], 1) for s in images}) >= 5
    descriptions = [s.answer for s in images if s.task == "describe"]
    assert len({d.split(".")[0].split(" ", 2)[1] for d in descriptions}) >= 3  # several openers


def test_descriptions_are_20_to_80_tokens():
    """Issue #2's bound, in the shipped tokenizer's tokens, for every scene size."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained("assets/tiny-vlm")
    samples = [world.make_sample(i, kind="image", task="describe", size_range=(64, 64)) for i in range(300)]
    assert {len(s.objects) for s in samples} == set(range(1, 7))
    lengths = [len(tok.encode(s.answer)) for s in samples]
    assert min(lengths) >= 20 and max(lengths) <= 80


def test_object_range_bounds_a_scenes_objects_and_keeps_the_default_stream():
    crowded = [world.make_sample(i, kind="image", object_range=(5, 9)) for i in range(40)]
    assert {len(s.objects) for s in crowded} == set(range(5, 10))
    # The default range draws exactly what the generator drew before the argument existed.
    assert world.SCENE_OBJECTS == (1, 6)
    assert world.make_sample(21, kind="image").answer == world.make_sample(21, kind="image", object_range=(1, 6)).answer
