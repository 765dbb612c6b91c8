"""helpers.own_data and helpers.own_data_run: layouts, the validator (each bad-row kind), token
counts against the processor, the demo dataset writer, and the command line on a tiny dataset."""

import json
import re
from pathlib import Path

import pytest

from helpers import own_data, own_data_run
from helpers.qwen import load_processor
from helpers.vision import open_image

IMAGE_PAD = 151655


@pytest.fixture(scope="module")
def processor():
    return load_processor(min_pixels=28 * 28, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return own_data.write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=9, n_test=3)


def _row(question, answer, images=("images/train_0000.png",), placeholders=1):
    content = [{"type": "image"}] * placeholders + [{"type": "text", "text": question}]
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": list(images),
    }


def test_demo_dataset_is_written_as_a_reader_would_write_it(demo, tmp_path):
    assert sorted(p.name for p in demo.iterdir()) == ["images", "test.jsonl", "train.jsonl"]
    rows = own_data.read_rows(demo, cache_dir=tmp_path)
    assert {k: len(v) for k, v in rows.items()} == {"train": 9, "test": 3}
    tasks = {own_data.infer_task(own_data.answer_text(r["messages"]))[0] for r in rows["train"]}
    assert tasks == {"count", "attribute", "grounding"}
    again = own_data.write_demo_dataset(tmp_path / "again", n_train=9, n_test=3)
    assert (again / "train.jsonl").read_text() == (demo / "train.jsonl").read_text()  # deterministic by seed
    with pytest.raises(ValueError, match="n_train=0"):
        own_data.write_demo_dataset(tmp_path / "bad", n_train=0)


def test_demo_rows_validate_and_their_boxes_lie_on_the_shape(demo, processor, tmp_path):
    rows = own_data.read_rows(demo, cache_dir=tmp_path)["train"]
    report = own_data.validate(rows, demo, processor)
    assert report.problems == [] and report.good == list(range(9))
    row = next(r for r in rows if "bbox_2d" in own_data.answer_text(r["messages"]))
    image = open_image(demo / row["images"][0])
    x1, y1, x2, y2 = (int(v) for v in own_data.answer_boxes(own_data.answer_text(row["messages"]))[0])
    centre = image.getpixel(((x1 + x2) // 2, (y1 + y2) // 2))
    from helpers.data import COLOURS

    label = own_data.answer_text(row["messages"]).split('"label": "')[1].split()[0]
    assert centre == COLOURS[label]  # the pasted shape's colour at its box centre


def test_token_counts_equal_the_processor(demo, processor, tmp_path):
    rows = own_data.read_rows(demo, cache_dir=tmp_path)["train"]
    for row in rows[:4]:
        image = open_image(demo / row["images"][0])
        counted = own_data.row_tokens(row["messages"], [(image.height, image.width)], processor)
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        assert counted["total"] == len(ids)
        assert counted["image"] == ids.count(IMAGE_PAD)
        assert counted["image_end"] == max(i for i, t in enumerate(ids) if t == IMAGE_PAD) + 1
        assert ids[counted["answer_end"] - 1] == 151645  # <|im_end|> closes the answer


def test_qwen_vl_finetune_and_sharegpt_rows_convert_to_the_messages_layout(processor):
    qwen = {
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}],
    }
    sharegpt = {
        "messages": [{"role": "user", "content": "<image>What colour is it?"}, {"role": "assistant", "content": "red"}],
        "images": ["a.png"],
    }
    want = _row("What colour is it?", "red", images=["a.png"])
    assert own_data.from_qwen_vl_finetune(qwen) == want
    assert own_data.to_messages_layout(qwen) == want == own_data.to_messages_layout(sharegpt)
    unified = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "text": None}, {"type": "text", "text": "What colour is it?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
        "images": "a.png",
    }
    assert own_data.to_messages_layout(unified) == want  # datasets' null keys dropped, one path listed
    two = own_data.from_qwen_vl_finetune(
        {
            "image": ["a.png", "b.png"],
            "conversations": [{"from": "human", "value": "<image><image>Same?"}, {"from": "gpt", "value": "no"}],
        }
    )
    assert two["images"] == ["a.png", "b.png"] and [p["type"] for p in two["messages"][0]["content"]] == [
        "image",
        "image",
        "text",
    ]
    with pytest.raises(ValueError, match="'from'"):
        own_data.from_qwen_vl_finetune({"image": "a.png", "conversations": [{"from": "bot", "value": "x"}]})
    with pytest.raises(ValueError, match="accepted layouts"):
        own_data.to_messages_layout({"prompt": "x"})


def _bad_dataset(folder: Path, demo: Path) -> list[dict]:
    (folder / "images").mkdir(parents=True)
    for name in ("train_0000.png", "train_0001.png"):  # 112×84 or 84×112 images, kept by smart_resize
        (folder / "images" / name).write_bytes((demo / "images" / name).read_bytes())
    (folder / "images" / "broken.png").write_text("not an image")
    image = open_image(folder / "images" / "train_0000.png")
    w, h = image.width, image.height
    box = lambda b: json.dumps([{"bbox_2d": b, "label": "x"}])  # noqa: E731
    return [
        _row("Fine?", "yes"),  # 0 good
        _row("Where?", "here", images=["images/missing.png"]),  # 1 missing file
        _row("Where?", "here", images=["images/broken.png"]),  # 2 unreadable
        _row("Where?", "here", placeholders=2),  # 3 placeholders ≠ images
        _row("Where?", "   "),  # 4 empty answer
        _row("Where?", box([w - 10, 5, w + 30, 20])),  # 5 outside the image
        _row("Where?", box([0.1, 0.2, 0.5, 0.6])),  # 6 fractions
        _row("Where?", box([100, 100, 900, 950])),  # 7 Qwen2-VL 0–1000
        _row("Where?", box([2, 2, w - 2, h - 2])),  # 8 good box
    ]


def test_validator_names_each_bad_row_and_its_problem(demo, processor, tmp_path):
    rows = _bad_dataset(tmp_path / "bad", demo)
    report = own_data.validate(rows, tmp_path / "bad", processor)
    assert report.good == [0, 8]
    expected = {
        1: "does not exist",
        2: "cannot be read as an image",
        3: "2 image placeholder(s) but 1 image",
        4: "empty answer",
        5: "outside the",
        6: "fractions",
        7: "0–1000",
    }
    for row, words in expected.items():
        lines = [p for p in report.problems if p.startswith(f"train row {row}:")]
        assert len(lines) == 1 and words in lines[0], (row, lines)
    with pytest.raises(ValueError) as error:
        report.raise_if_bad()
    assert all(f"train row {row}:" in str(error.value) for row in expected)  # every problem, not only the first


def test_validator_catches_original_pixel_boxes_and_truncation(demo, tmp_path):
    big = load_processor(min_pixels=28 * 28, max_pixels=56 * 56)  # the 112-px images shrink to 56-ish px
    row = _row("Where?", json.dumps([{"bbox_2d": [40, 40, 80, 80], "label": "x"}]))
    image = open_image(demo / row["images"][0])
    h, w, _ = own_data.image_tokens(image.height, image.width, big)
    report = own_data.validate([row], demo, big)
    assert len(report.problems) == 1 and "train row 0:" in report.problems[0]
    assert (
        f"fits the original {image.width}×{image.height} pixels" in report.problems[0]
        and f"({h}, {w})" in report.problems[0]
    )
    tokens = own_data.validate([_row("Where?", "here")], demo, big).tokens
    cut = own_data.validate([_row("Where?", "here")], demo, big, max_length=tokens[0]["image_end"] - 1)
    assert len(cut.problems) == 1 and re.search(
        r"train row 0: .*truncates through the image \(trap 6\)", cut.problems[0]
    )
    answer = own_data.validate([_row("Where?", "here")], demo, big, max_length=tokens[0]["answer_end"] - 1)
    assert "cuts the answer" in answer.problems[0]
    assert own_data.validate([_row("Where?", "here")], demo, big, max_length=tokens[0]["answer_end"]).problems == []
    with pytest.raises(ValueError, match="max_length=0"):
        own_data.validate([row], demo, big, max_length=0)


def test_an_image_smart_resize_refuses_is_a_row_problem(processor, tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (6000, 20)).save(tmp_path / "images" / "thin.png")  # 300:1, over the 200:1 limit
    report = own_data.validate([_row("What?", "x", images=["images/thin.png"])], tmp_path, processor)
    assert len(report.problems) == 1 and report.problems[0].startswith("train row 0: an image cannot be resized")


def test_missing_dataset_and_samples(demo, processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        own_data.split_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        own_data.split_files(tmp_path / "nowhere")
    rows = own_data.read_rows(demo / "test.jsonl", cache_dir=tmp_path)["train"]
    report = own_data.validate(rows, demo, processor)
    samples = own_data.to_samples(rows, demo, report)
    assert [s.answer for s in samples] == [own_data.answer_text(r["messages"]) for r in rows]
    assert own_data.infer_task("3") == ("count", 3) and own_data.infer_task("red") == ("attribute", "red")
    assert own_data.infer_task("a red square") == ("text", "a red square")
    hf = own_data.as_hf_dataset(rows, demo)
    assert hf[0]["images"][0].size == open_image(demo / rows[0]["images"][0]).size  # decoded to PIL by datasets


def test_estimate_and_widget(demo, processor, tmp_path):
    rows = own_data.read_rows(demo, cache_dir=tmp_path)
    reports = {s: own_data.validate(r, demo, processor, split=s) for s, r in rows.items()}
    from helpers.qwen import qwen25vl_3b_config

    est = own_data.estimate(reports["train"], qwen25vl_3b_config().text_config, 3_000_000_000, 1000)
    assert est["tokens"] == est["image_tokens"] + est["text_tokens"] == sum(t["total"] for t in reports["train"].tokens)
    assert est["memory"]["weights (bf16)"] == 6_000_000_000 and est["memory"]["grads + AdamW (fp32)"] == 12_000
    own_data_run.browse_data(demo, processor, rows, reports)
    view = own_data_run.row_view("train", 1)
    assert view.data["problems"] == [] and "<|image_pad|>" in view.data["prompt"]
    own_data_run.token_figure(reports, {"3B": est}).savefig(tmp_path / "f.png")


def test_command_line_trains_a_tiny_dataset(tmp_path, capsys):
    from helpers import checkpoints
    from helpers.qwen import load_model
    from helpers.sft import main

    start = checkpoints.save_checkpoint(tmp_path / "start", load_model(), load_processor(), {"step": 0})
    data = own_data.write_demo_dataset(tmp_path / "data", n_train=6, n_test=3)
    main(
        [
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(start),
            "--steps",
            "2",
            "--metrics",
            str(tmp_path / "m.json"),
        ]
    )
    printed = capsys.readouterr().out
    assert "rows: {'train': 6, 'test': 3}" in printed and "held-out answer loss" in printed
    assert checkpoints.is_complete(tmp_path / "out")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["after"]["scores"]) == 3
    with pytest.raises(ValueError, match="rows cannot be trained on"):
        (data / "images" / "train_0000.png").unlink()
        main(["--data", str(data), "--out", str(tmp_path / "out2"), "--model", str(start), "--steps", "1"])
