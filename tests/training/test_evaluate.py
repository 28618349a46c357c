import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ninlab.cli import main
from ninlab.errors import NinlabError
from ninlab.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from ninlab.training.data import CLASS_NAMES, Split
from ninlab.training.evaluate import (
    ClassResult,
    evaluate,
    evaluate_model,
    load_image,
    load_trained_model,
    predict_images,
)
from ninlab.training.pipeline import InputTransform
from ninlab.training.presets import PRESETS
from ninlab.training.train import train


@pytest.fixture(scope="module")
def run_dir(fashion_mnist, tmp_path_factory) -> Path:
    config = dataclasses.replace(
        PRESETS["cpu"], image_size=67, epochs=1, train_examples=1024, test_examples=300, amp="none"
    )
    path = tmp_path_factory.mktemp("eval") / "run"
    train(config, output_dir=path, data=fashion_mnist)
    return path


def test_evaluation_counts_agree_with_a_plain_forward_pass(run_dir, fashion_mnist):
    trained = load_trained_model(run_dir)
    test = fashion_mnist.test.head(300)
    evaluation = evaluate_model(trained.model, test, transform=trained.transform, batch_size=64)
    with torch.no_grad():
        logits = trained.model(trained.transform(test.images))
    predicted = logits.argmax(1)
    assert evaluation.examples == 300
    assert evaluation.correct == int((predicted == test.labels).sum())
    assert evaluation.confusion[3][5] == int(((test.labels == 3) & (predicted == 5)).sum())
    assert evaluation.loss == pytest.approx(
        torch.nn.functional.cross_entropy(logits, test.labels).item(), rel=1e-5
    )
    assert [sum(row) for row in evaluation.confusion] == test.labels.bincount(minlength=10).tolist()
    trousers = evaluation.per_class[1]
    assert (trousers.name, trousers.examples) == ("Trouser", int((test.labels == 1).sum()))
    assert trousers.correct == int(((test.labels == 1) & (predicted == 1)).sum())
    assert trousers.accuracy == trousers.correct / trousers.examples
    # The history's last test accuracy is this same measurement.
    assert load_checkpoint(run_dir)["history"][-1]["test_accuracy"] == evaluation.accuracy


def test_evaluate_sees_the_network_as_it_was_trained(run_dir, fashion_mnist):
    # Its input size, normalisation, precision and layout: the run's own evaluation, image
    # for image.
    evaluation = evaluate(load_trained_model(run_dir), fashion_mnist.test.head(300), batch_size=64)
    assert evaluation.examples == 300
    assert evaluation.accuracy == load_checkpoint(run_dir)["history"][-1]["test_accuracy"]


def test_evaluate_cli_prints_classes_and_writes_the_confusion_png(run_dir, capsys):
    assert (
        main(
            [
                "evaluate",
                str(run_dir),
                "--test-examples",
                "300",
                "--no-download",
                "--format",
                "json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 300 and [row["name"] for row in report["per_class"]] == list(
        CLASS_NAMES
    )
    assert sum(row["examples"] for row in report["per_class"]) == 300
    assert sum(row["correct"] for row in report["per_class"]) == round(report["accuracy"] * 300)
    assert Path(report["confusion_png"]).read_bytes()[:4] == b"\x89PNG"
    assert (
        main(
            ["evaluate", str(run_dir / CHECKPOINT_NAME), "--test-examples", "300", "--no-download"]
        )
        == 0
    )
    table = capsys.readouterr().out
    boots = report["per_class"][-1]
    assert re.search(rf"Ankle boot +│ +{boots['examples']} │ +{boots['accuracy']:.4f} │", table)
    assert f"{report['accuracy']:.4f}" in table


def test_predict_gives_the_class_the_evaluation_gives(run_dir, fashion_mnist, tmp_path, capsys):
    trained = load_trained_model(run_dir)
    images = fashion_mnist.test.images[:4]
    with torch.no_grad():
        expected = trained.model(trained.transform(images)).softmax(1)
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image.numpy()).save(paths[-1])
    predictions = predict_images(trained, paths)
    assert [p.class_index for p in predictions] == expected.argmax(1).tolist()
    assert [p.probability for p in predictions] == pytest.approx(
        expected.max(1).values.tolist(), rel=1e-5
    )
    # Any size, colour and polarity: a 3x larger RGB negative of image 0 comes back close to
    # image 0.
    photo = Image.fromarray(255 - images[0].numpy()).resize((84, 84), Image.BILINEAR).convert("RGB")
    photo.save(tmp_path / "photo.jpg", quality=95)
    restored = load_image(tmp_path / "photo.jpg", invert=True).float().flatten()
    assert torch.corrcoef(torch.stack([restored, images[0].float().flatten()]))[0, 1] > 0.97
    assert main(["predict", str(run_dir), str(paths[0])]) == 0
    assert (
        capsys.readouterr().out.strip()
        == f"{paths[0]}: {predictions[0].class_name} ({predictions[0].probability:.3f})"
    )


def test_load_image_shrinks_to_28_like_pil(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    expected = np.asarray(Image.fromarray(pixels).convert("L").resize((28, 28), Image.BILINEAR))
    assert np.array_equal(load_image(tmp_path / "x.png").numpy(), expected)


def test_unreadable_image_is_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["predict", str(run_dir), str(tmp_path / "notes.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read image" in err and "notes.png" in err


def test_checkpoint_whose_weights_are_another_variant_is_refused(run_dir, tmp_path):
    state = load_checkpoint(run_dir)
    state["config"]["variant"] = "nin-d2l-1x1"  # weights of nin-d2l-bn, labelled as another network
    save_checkpoint(tmp_path / CHECKPOINT_NAME, state)
    with pytest.raises(NinlabError, match="do not fit variant 'nin-d2l-1x1'"):
        load_trained_model(tmp_path)


def test_evaluation_on_a_split_needs_no_training_run():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    torch.nn.init.zeros_(model[1].weight)
    torch.nn.init.zeros_(model[1].bias)
    split = Split(torch.zeros(20, 28, 28, dtype=torch.uint8), torch.arange(20) % 10)
    evaluation = evaluate_model(model, split, transform=InputTransform(28), batch_size=8)
    # All-zero logits: argmax is class 0, every example is counted as "dead", the loss is ln 10.
    assert evaluation.zero_logit_examples == 20 and evaluation.correct == 2
    assert evaluation.loss == pytest.approx(np.log(10))
    assert evaluation.per_class[0] == ClassResult("T-shirt/top", 2, 2, 1.0)
    assert evaluation.per_class[9] == ClassResult("Ankle boot", 2, 0, 0.0)


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror(fashion_mnist):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    split = Split(fashion_mnist.test.images[:40], fashion_mnist.test.labels[:40])
    evaluation = evaluate_model(
        model, split, transform=InputTransform(28), batch_size=16, flip_tta=True
    )
    inputs = InputTransform(28)(split.images)
    with torch.no_grad():
        logits = (model(inputs) + model(inputs.flip(-1))) / 2
    assert evaluation.correct == int((logits.argmax(1) == split.labels).sum())
    assert evaluation.loss_sum == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, split.labels, reduction="sum")), rel=1e-6
    )
    plain = evaluate_model(model, split, transform=InputTransform(28), batch_size=16)
    assert plain.loss_sum != pytest.approx(evaluation.loss_sum)  # the mirror images count


def test_a_class_the_set_lacks_has_no_accuracy():
    # A few --test-examples may hold no image of a class: its accuracy is None (JSON null), not nan.
    split = Split(torch.zeros(3, 28, 28, dtype=torch.uint8), torch.tensor([0, 0, 1]))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    evaluation = evaluate_model(model, split, transform=InputTransform(28), batch_size=8)
    assert [row.examples for row in evaluation.per_class] == [2, 1] + [0] * 8
    assert evaluation.per_class[5] == ClassResult("Sandal", 0, 0, None)
