"""The tiny model's training script: block-diffusion layout, world labels, attention guidance, fine-tuning.

These pieces decide what the bundled model can learn in its CPU budget; a silent mistake in them (a noisy
block that sees its own answer, guidance pointing at the wrong cell) trains a model that looks fine by its
loss and answers nothing right.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime.checkpoint import TINY_CHECKPOINT
from runtime.tiny import train
from runtime.tokens import TokenCodec


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    train.train_text_tokenizer(folder, seed=0)
    return TokenCodec.from_pretrained(folder, config={"vocab_size": train.TEXT_VOCAB_SIZE + train.NUM_CODES,
                                                      "image_token_offset": train.TEXT_VOCAB_SIZE})


def code(codec, cell, shape=None, color=None):
    from runtime.tiny.world import Shape

    thing = None if shape is None else Shape(shape, color, cell)
    return codec.code_id(train.cell_code(cell, thing))


def sequence(prompt, response):
    """A TrainSequence of prompt ids (given) then response ids (to produce)."""
    ids = list(prompt) + list(response)
    return train.TrainSequence(ids, [False] * len(prompt) + [True] * len(response),
                               [False] * len(ids))


def test_world_labels_read_cells_shapes_and_colours_from_words_and_codes(codec):
    world = train.WorldLabels(codec)
    words = codec.encode_text("a red circle at the top-left and a blue square at the left")
    codes = [code(codec, "top-left", "circle", "red"), code(codec, "left")]
    labels = world(words + codes)
    cells = [train.CELLS[c] if c >= 0 else None for c in labels["cell"]]
    named = [(codec.decode([t]), cell) for t, cell in zip(words, cells) if cell]
    # "top-left" is one token, the cell's name; it does not also name the cell "left".
    assert named == [(" top-left", "top-left"), (" left", "left")]
    shapes = {codec.decode([t]).strip(): s for t, s in zip(words, labels["shape"]) if s >= 0}
    colors = {codec.decode([t]).strip(): c for t, c in zip(words, labels["color"]) if c >= 0}
    assert shapes == {"circle": train.SHAPES.index("circle"), "square": train.SHAPES.index("square")}
    assert colors == {"red": train.COLORS.index("red"), "blue": train.COLORS.index("blue")}
    # The red circle's code names its cell, shape and colour; the empty cell's code only its cell.
    tail = {field: values[-2:] for field, values in labels.items()}
    assert tail == {"cell": [0, 3], "shape": [train.SHAPES.index("circle"), -1],
                    "color": [train.COLORS.index("red"), -1], "is_code": [1, 1]}


def test_every_cell_shape_and_colour_name_is_one_token_with_or_without_a_space(codec):
    # Split names made prefixes of answers ("bottom" of "bottom-left"); half-written names came out.
    for word in (*train.CELLS, *train.SHAPES, *train.COLORS):
        for prefix in ("", " "):
            assert len(codec.encode_text(prefix + word)) == 1, prefix + word


def test_a_noisy_copy_sees_earlier_clean_blocks_and_itself_never_its_answer_or_other_copies(codec):
    world = train.WorldLabels(codec)
    prompt = codec.encode_text("a " * 40)[:40]
    seq = sequence(prompt, codec.encode_text("b " * 50)[:50])
    layout = train.noisy_layout(seq, random.Random(0), codec.special.mask, world, copies=2)
    batch = train.pack([layout], 512)
    mask = batch["mask"][0]
    kind, block, group = torch.tensor(layout.kind), torch.tensor(layout.block), torch.tensor(layout.group)
    # 90 tokens: the answer spans blocks 1 and 2, each copied twice; a copy never straddles blocks.
    copies = {(int(b), int(g)) for b, g, k in zip(block, group, kind) if k == 1}
    assert len(copies) == 4 and len({g for _, g in copies}) == 4 and {b for b, _ in copies} == {1, 2}
    for q in range(len(layout.ids)):
        for k in range(len(layout.ids)):
            if kind[q] == 1:
                expected = bool((kind[k] == 0 and block[k] < block[q]) or (kind[k] == 1 and group[k] == group[q]))
            else:
                expected = bool(kind[k] == 0 and block[k] <= block[q])
            assert bool(mask[q, k]) == expected, (q, k)
    # Every masked target sits in a noisy copy at its own position, and the clean copy holds the truth there.
    for index, target in enumerate(layout.target):
        if target >= 0:
            assert layout.kind[index] == 1 and layout.ids[index] == codec.special.mask
            assert seq.ids[layout.positions[index]] == target


def test_guidance_points_codes_at_their_cell_and_answer_words_at_the_codes_holding_them(codec):
    world = train.WorldLabels(codec)
    source = [code(codec, cell, "circle", "red") if cell == "top-left" else code(codec, cell)
              for cell in train.CELLS]
    prompt = source + codec.encode_text(" move it to the center. what color is it?")
    answer = codec.encode_text("red")
    drawn = [code(codec, cell, "circle", "red") if cell == "center" else code(codec, cell) for cell in train.CELLS]
    seq = sequence(prompt, answer + drawn)
    rng = random.Random(0)
    layout = train.noisy_layout(seq, rng, codec.special.mask, world)
    batch = train.pack([layout], 512)
    guide, target, ids = batch["guide"][0], batch["target"][0], batch["ids"][0]
    truth = torch.where(target >= 0, target, ids)
    assert guide.any()
    for q in guide.any(-1).nonzero()[:, 0].tolist():
        assert target[q] >= 0, "only masked tokens are guided"
        keys = guide[q].nonzero()[:, 0].tolist()
        assert all(target[k] < 0 and batch["mask"][0, q, k] for k in keys), "guided only to visible, unmasked keys"
        seen = {codec.decode([int(truth[k])]) if not codec.is_image_id(int(truth[k])) else codec.code_of(int(truth[k]))
                for k in keys}
        if codec.is_image_id(int(truth[q])):
            cell = codec.code_of(int(truth[q])) // train.CONTENTS
            expected = {codec.code_of(source[cell])}
            if train.CELLS[cell] == "center":
                expected.add(" center")
            assert seen <= expected and seen, (q, seen)
        else:  # the answer "red" looks at the red circle's code
            assert codec.decode([int(truth[q])]) == "red"
            assert seen == {train.cell_code("top-left", None) + 1 + train.COLORS.index("red")}


def test_an_answer_with_focus_cells_looks_at_those_cells_codes_and_nowhere_else(codec):
    world = train.WorldLabels(codec)
    scene = [code(codec, cell, "square", "red") if cell == "top-left" else
             code(codec, cell, "circle", "blue") if cell == "center" else code(codec, cell) for cell in train.CELLS]
    prompt = scene + codec.encode_text(" is the center empty?")
    answer = codec.encode_text("no") + [codec.special.eos] * 3

    def guided(focus: tuple[str, ...]) -> dict[str, set[int]]:
        """Each guided target's keys, by position."""
        seq = sequence(prompt, answer)
        seq.focus = sum(1 << train.CELLS.index(cell) for cell in focus)
        train_rng = random.Random(0)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train, "FULL_MASK", 1.0)  # every answer token masked
            layout = train.noisy_layout(seq, train_rng, codec.special.mask, world)
        batch = train.pack([layout], 512)
        guide, target = batch["guide"][0], batch["target"][0]
        return {codec.decode([int(target[q])]): {layout.positions[k] for k in guide[q].nonzero()[:, 0].tolist()}
                for q in (target >= 0).nonzero()[:, 0].tolist() if guide[q].any()}

    # "no" looks at the center's code (position 4 of the raster) only; end-of-text padding is never guided.
    assert guided(("center",)) == {"no": {train.CELLS.index("center")}}
    assert guided(("top-left", "center")) == {"no": {0, 4}}
    # Without focus cells the word "no" names nothing in the world: no guidance.
    assert guided(()) == {}


def test_a_built_question_guides_its_answer_to_the_focus_cells_of_its_picture():
    from runtime.tiny import tasks

    codes = train.SceneCodes(TINY_CHECKPOINT / "image_tokenizer")
    builder = train.SequenceBuilder(TINY_CHECKPOINT, codes)
    world = train.WorldLabels(builder.codec)
    rng = random.Random(4)
    examples = [e for e in (tasks.sample_example("qa", rng, "exclude") for _ in range(60)) if e.subtype == "yes_no"]
    assert examples
    for example in examples:
        codes.prepare(example.scenes())
        seq = builder.build(example, rng)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train, "FULL_MASK", 1.0)
            layout = train.noisy_layout(seq, rng, builder.codec.special.mask, world)
        batch = train.pack([layout], 512)
        guide, target = batch["guide"][0], batch["target"][0]
        (answer,) = [q for q in (target >= 0).nonzero()[:, 0].tolist() if builder.codec.decode([int(target[q])])
                     in ("yes", "no")]
        # The picture's codes are the first image ids of the conversation, in raster order.
        picture = [p for p, token in enumerate(layout.ids) if builder.codec.is_image_id(token)][:len(train.CELLS)]
        assert guide[answer].nonzero()[:, 0].tolist() == [picture[train.CELLS.index(c)] for c in
                                                          sorted(example.focus, key=train.CELLS.index)]


def test_the_loss_adds_guidance_and_reading_terms_that_stay_out_of_the_checkpoint(codec):
    world = train.WorldLabels(codec)
    torch.manual_seed(0)
    backbone = train.Backbone(train.backbone_config(codec.special.as_dict()), codec)
    source = [code(codec, cell, "square", "green") if cell == "right" else code(codec, cell) for cell in train.CELLS]
    seq = sequence(source + codec.encode_text(" keep it."), source)
    batch = train.pack([train.noisy_layout(seq, random.Random(1), codec.special.mask, world)], 512)
    loss = backbone.loss(batch)
    assert torch.isfinite(loss)
    last = backbone.last
    expected = last["tokens"] + train.GUIDE_WEIGHT * last["guide"] + train.READ_WEIGHT * last["read"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert last["guide"] > 0 and last["read"] > 0
    loss.backward()
    guided = backbone.model.model.layers[train.GUIDED_LAYERS[0]].attention.query_key_value.weight
    assert guided.grad is not None and guided.grad.abs().sum() > 0
    # The reading heads train with the model but are not part of the checkpoint.
    reader = backbone.model.readers[str(train.GUIDED_LAYERS[0])].weight
    assert reader.grad is not None and reader.grad.abs().sum() > 0
    exported = backbone.export_state()
    assert not any("readers" in name for name in exported)
    assert set(exported) == set(train.LLaDA2MoeModelLM(train.LLaDA2MoeConfig(**backbone.config)).state_dict())


def test_the_training_moe_block_matches_the_model_block_and_plain_autograd_bit_for_bit(codec):
    """The training arrangement of the MoE block (`train.moe_forward`, with `train.Permute`) must be the same
    math to the last bit: the committed checkpoint is reproduced only if every step rounds alike."""
    torch.manual_seed(0)
    model = train.LLaDA2MoeModelLM(train.LLaDA2MoeConfig(**train.backbone_config(codec.special.as_dict())))
    block = model.model.layers[-1].mlp
    x = torch.randn(3, 40, model.config.hidden_size)

    def plain(x):
        tokens = x.reshape(-1, x.shape[-1])
        experts, weights = block.gate(tokens)
        order = experts.flatten().argsort(stable=True)
        counts = torch.bincount(experts.flatten(), minlength=len(block.experts)).tolist()
        routed_in = tokens[order // experts.shape[1]]
        pieces = [e(c) for e, c, n in zip(block.experts, routed_in.split(counts), counts) if n]
        per_slot = torch.cat(pieces)[torch.argsort(order)]
        mixed = (per_slot.view(*experts.shape, -1).float() * weights[..., None]).sum(1)
        return (mixed.to(x.dtype) + block.shared_experts(tokens)).view(x.shape)

    grads = []
    for forward in (lambda x: train.moe_forward(block, x), plain):
        leaf = x.clone().requires_grad_()
        out = forward(leaf)
        assert torch.equal(out, block(x))
        out.pow(2).sum().backward()
        grads.append((leaf.grad, [p.grad.clone() for p in block.parameters() if p.grad is not None]))
        block.zero_grad(set_to_none=True)
    assert torch.equal(grads[0][0], grads[1][0])
    assert len(grads[0][1]) == len(grads[1][1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_decoder_latents_are_encoded_once_per_scene_and_equal_a_direct_encode():
    from runtime.tiny.world import render
    from runtime.vision.decoder import load_vae

    vae = load_vae(TINY_CHECKPOINT / "vae", dtype=torch.float32, device="cpu")
    latents = train.SceneLatents(vae, batch=2)
    rng = random.Random(0)
    scenes = list(dict.fromkeys(train.training_scene(rng) for _ in range(5)))
    assert len(scenes) == 5
    calls = []
    encode = vae.encode
    vae.encode = lambda x: calls.append(len(x)) or encode(x)
    first = latents([scenes[0], scenes[1], scenes[0]])
    both = latents(scenes)
    assert calls == [2, 2, 1]  # two new scenes, then the other three in batches of at most 2
    assert torch.equal(first[0], first[2]) and torch.equal(both[:2], first[:2])
    x = torch.stack([train.to_pixels(render(s, train.DECODED_PIXELS)) for s in scenes])
    with torch.no_grad():
        direct = (encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(both, direct, rtol=1e-4, atol=1e-5)


def read_tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def test_a_written_backbone_loads_back_with_each_table_solved_into_its_parts():
    codec = TokenCodec.from_pretrained(TINY_CHECKPOINT)
    config = json.loads((TINY_CHECKPOINT / "config.json").read_text())
    backbone = train.Backbone(config, codec)
    backbone.load_checkpoint(TINY_CHECKPOINT)
    stored, exported = read_tensors(TINY_CHECKPOINT), backbone.export_state()
    assert set(stored) == set(exported)
    for name, tensor in stored.items():
        if name in ("model.word_embeddings.weight", "lm_head.weight"):
            # Every code row (held-out ones too) is rebuilt from its parts: equal up to bf16 rounding.
            torch.testing.assert_close(exported[name].float(), tensor.float(), atol=2e-3, rtol=1e-2)
        else:
            assert torch.equal(exported[name], tensor), name


def test_the_finetune_stage_trains_the_layers_and_keeps_the_vocabulary_tables(tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(TINY_CHECKPOINT, folder)
    train.train_backbone(folder, tmp_path / "work", seed=0, steps=2, resume=False, recipe=train.FINETUNE)
    before, after = read_tensors(TINY_CHECKPOINT), read_tensors(folder)
    assert set(before) == set(after)
    for name in ("model.word_embeddings.weight", "lm_head.weight"):
        torch.testing.assert_close(after[name].float(), before[name].float(), atol=2e-3, rtol=1e-2)
    layer = "model.layers.1.attention.query_key_value.weight"
    assert not torch.equal(after[layer], before[layer])
    assert (tmp_path / "work" / "finetune_state.pt").is_file()


def test_the_error_breakdown_bench_counts_every_example_once():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "tiny_errors.py"
    result = subprocess.run([sys.executable, str(script), "--samples", "3", "--seed", "1"],
                            capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for family in ("qa", "riddle_thinking", "multiturn", "edit", "holdout_t2i"):
        counts = [tuple(map(int, value.split("/"))) for value in report[family].values()]
        assert sum(total for _, total in counts) == 3
        assert all(0 <= right <= total for right, total in counts)
    assert all(key.startswith("purple triangle drawn as ") for key in report["holdout_t2i"])


def test_the_story_bench_counts_frames_and_first_pictures_that_repeat_a_shape():
    import importlib.util
    import subprocess
    import sys

    from runtime.tiny.world import Scene, Shape

    script = Path(__file__).resolve().parent.parent / "bench" / "tiny_story.py"
    spec = importlib.util.spec_from_file_location("tiny_story", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    repeats_a_shape = bench.repeats_a_shape
    twice = Scene.of(Shape("circle", "red", "top"), Shape("circle", "red", "left"))
    once = Scene.of(Shape("circle", "red", "top"), Shape("circle", "blue", "left"))
    assert repeats_a_shape([("", twice), ("", once)]) and not repeats_a_shape([("", once), ("", twice)])
    assert not repeats_a_shape([]) and not repeats_a_shape([("", None)])
    result = subprocess.run([sys.executable, str(script), "--samples", "2"], capture_output=True, text=True,
                            timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["stories"] == 2 and 0 <= report["frames_drawn"] <= report["frames_asked"] <= 8
    assert 0 <= report["consistent"] <= 2 and 0 <= report["first_frame_repeats_a_shape"] <= 2


def test_the_training_step_bench_times_both_stages_alone_and_as_a_team_in_their_own_loops():
    import math
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "tiny_train_step.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "1", "--workers", "1", "2"],
                            check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"backbone/1", "backbone/2", "finetune/1", "finetune/2", "backbone speed-up 1->2",
                           "finetune speed-up 1->2", "backbone stages minutes", "threads"}
    assert all(math.isfinite(value) for value in report.values())
    # The stages logged their own steps, alone and as a team: the bench ran the training loops, not a copy.
    for stage in ("backbone", "finetune"):
        assert f"{stage} step 2/2" in result.stdout and f"{stage} step 1/1" in result.stdout
        assert f"{stage}: " in result.stdout and "steps of" in result.stdout
    assert result.stdout.count("2 workers") == 4


def mixture_layouts(count, seed):
    """`count` training layouts of the fine-tune's mixture, built from the bundled checkpoint's tokenizers."""
    from runtime.tiny import tasks

    rng = random.Random(seed)
    codes = train.SceneCodes(TINY_CHECKPOINT / "image_tokenizer")
    builder = train.SequenceBuilder(TINY_CHECKPOINT, codes)
    world = train.WorldLabels(builder.codec)
    examples = [tasks.sample_mixture(rng, train.FINETUNE.mixture, holdout="exclude") for _ in range(count)]
    codes.prepare([scene for example in examples for scene in example.scenes()])
    return builder.codec, [train.noisy_layout(builder.build(example, rng), rng, builder.codec.special.mask, world)
                           for example in examples]


def test_a_team_s_shares_of_a_step_add_up_to_the_whole_step_s_loss_and_gradient():
    """What makes data-parallel training exact: each worker divides its share by the whole step's sums."""
    codec, layouts = mixture_layouts(8, seed=3)
    torch.manual_seed(0)
    backbone = train.Backbone(train.backbone_config(codec.special.as_dict()), codec)
    params = [p for p in backbone.model.parameters() if p.requires_grad]

    def gradients(batch, denominators=None):
        backbone.model.zero_grad(set_to_none=True)
        loss = backbone.loss(batch, denominators)
        loss.backward()
        return loss.item(), dict(backbone.last), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                                  for p in params]

    whole = train.pack(layouts, train.ROW_LENGTH)
    shares = [train.pack(layouts[rank::2], train.ROW_LENGTH) for rank in range(2)]
    total = sum(backbone.denominators(share) for share in shares)
    assert torch.equal(total, backbone.denominators(whole))
    assert (total > 0).all()  # every term has something to average over
    loss, terms, grads = gradients(whole)
    parts = [gradients(share, total) for share in shares]
    assert sum(part[0] for part in parts) == pytest.approx(loss, rel=1e-5)
    for name, value in terms.items():
        assert sum(part[1][name] for part in parts) == pytest.approx(value, rel=1e-4, abs=1e-6)
    for whole_grad, first, second in zip(grads, parts[0][2], parts[1][2]):
        torch.testing.assert_close(first + second, whole_grad, rtol=1e-4, atol=1e-6)
    # Dividing by its own share's sums instead would weigh the shares wrongly.
    assert parts[0][0] + parts[1][0] != pytest.approx(gradients(shares[0])[0] + gradients(shares[1])[0], rel=1e-3)


TEAM_MEMBER = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.tiny.train import Team

rank, folder = int(sys.argv[1]), Path(sys.argv[2])
Team.connect(rank, 2, folder)
team = Team(rank, 2, folder)
params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(1))]
results = []
for step in range(3):
    params[0].grad = torch.full((3, 2), (rank + 1.0) * (step + 1))
    params[1].grad = torch.arange(5.0) * (rank + 1) - step
    params[2].grad = torch.ones(1) if rank == 1 else None  # no token reached it on rank 0
    team.sum_gradients(params)
    results.append([p.grad.clone() for p in params])
    params[0].grad.mul_(100)  # clipping scales in place: must not reach the other worker's gradients
torch.save(results, folder / f"rank{rank}.pt")
dist.destroy_process_group()
"""


def test_a_team_of_two_processes_sums_gradients_through_shared_memory(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    workers = [subprocess.Popen([sys.executable, "-c", TEAM_MEMBER, str(rank), str(tmp_path)], cwd=root)
               for rank in range(2)]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for step in range(3):
        expected = [torch.full((3, 2), 3.0 * (step + 1)), torch.arange(5.0) * 3 - 2 * step, torch.ones(1)]
        for rank in range(2):
            for got, want in zip(results[rank][step], expected):
                assert torch.equal(got, want)


def test_a_team_of_two_trains_resumes_and_keeps_its_workers_models_identical(tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(TINY_CHECKPOINT, folder)
    # Each save first checks every worker holds the same model (`Team.check_in_step`).
    train.train_backbone(folder, tmp_path / "work", seed=0, steps=1, resume=False, recipe=train.FINETUNE, workers=2)
    state = torch.load(tmp_path / "work" / "finetune_state.pt", weights_only=False)
    assert (state["step"], state["workers"], len(state["layout_rngs"])) == (1, 2, 2)
    assert state["layout_rngs"][0] != state["layout_rngs"][1]  # each worker masks its own share
    train.train_backbone(folder, tmp_path / "work", seed=0, steps=2, resume=True, recipe=train.FINETUNE, workers=2)
    assert torch.load(tmp_path / "work" / "finetune_state.pt", weights_only=False)["step"] == 2
    layer = "model.layers.1.attention.query_key_value.weight"
    assert not torch.equal(read_tensors(folder)[layer], read_tensors(TINY_CHECKPOINT)[layer])
    with pytest.raises(ValueError, match="saved by 2 workers: resume with --workers 2"):
        train.train_backbone(folder, tmp_path / "work", seed=0, steps=3, resume=True, recipe=train.FINETUNE)


@pytest.mark.skipif(not Path("/dev/shm").is_dir() or not Path("/proc/self/task").is_dir(),
                    reason="the team's shared files live in /dev/shm; its workers are found through /proc")
def test_a_team_run_stopped_by_sigterm_leaves_no_workers_or_shared_files_behind(tmp_path):
    import signal
    import subprocess
    import sys

    folder = tmp_path / "checkpoint"
    shutil.copytree(TINY_CHECKPOINT, folder)
    before = set(Path("/dev/shm").iterdir())
    run = subprocess.Popen([sys.executable, "-m", "runtime.tiny.train", "finetune", "--out", str(folder), "--work",
                            str(tmp_path / "work"), "--scale", "0.01", "--workers", "2"],
                           cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True)
    try:
        for line in run.stdout:  # the leader's first line: every worker has joined the team
            if "steps of" in line:
                break
        workers = [int(pid) for task in Path(f"/proc/{run.pid}/task").iterdir()
                   for pid in (task / "children").read_text().split()]
        shared = [path for path in set(Path("/dev/shm").iterdir()) - before if (path / "gradients").exists()
                  or (path / "rendezvous").exists()]
        assert len(workers) >= 2 and len(shared) == 1, (workers, shared)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        run.kill()
        run.stdout.close()
    assert not shared[0].exists()

    def running(pid):  # a worker reparented to a PID 1 that does not reap may linger as a zombie
        status = Path(f"/proc/{pid}/status")
        return status.exists() and "\nState:\tZ" not in status.read_text()

    import time

    # Every child ends with the run; multiprocessing's resource tracker (a child too) only once it sees the
    # run gone, which may take a moment on a busy machine.
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:200]) for pid in workers if running(pid)]
