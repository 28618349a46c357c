"""The notebook's progress display: one output per epoch, redrawn in place, never a flood."""

from ninlab.training.progress import NotebookReporter


class _Notebook:
    """Records what a Jupyter kernel would be asked to show: new outputs and in-place updates."""

    def __init__(self):
        self.outputs = []  # the text of each output, as last drawn
        self.updates = 0  # redraws of an output in place

    def display(self, data, *, raw, display_id=False):
        assert raw
        self.outputs.append(data["text/plain"])
        index = len(self.outputs) - 1
        return _Handle(self, index) if display_id else None


class _Handle:
    def __init__(self, notebook, index):
        self.notebook, self.index = notebook, index

    def update(self, data, *, raw):
        self.notebook.outputs[self.index] = data["text/plain"]
        self.notebook.updates += 1


def test_an_epoch_is_one_output_redrawn_at_most_every_interval_then_its_line():
    notebook = _Notebook()
    reporter = NotebookReporter(interval=3600.0)
    reporter._display = notebook.display  # the kernel's display, recorded
    reporter.info("training nin-d2l-bn")
    reporter.epoch_started(1, 2, batches=500, done=0)
    for done in range(1, 501):
        reporter.batch_done(done, loss=2.0, accuracy=0.5, examples_per_s=100.0)
    assert (
        notebook.updates == 0
        and notebook.outputs[1].startswith("epoch 1/2")
        and "0/500" in notebook.outputs[1]
    )
    reporter.info("measured: 100 examples/s")  # said during the epoch: shown above its bar, at once
    assert notebook.outputs[1].splitlines()[0] == "measured: 100 examples/s"
    assert (
        "500/500" in notebook.outputs[1]
        and "loss 2.0000  acc 0.500  100 ex/s" in notebook.outputs[1]
    )
    reporter.epoch_finished("epoch 1/2: test acc 0.5000")
    assert notebook.outputs == [
        "training nin-d2l-bn\n",
        "measured: 100 examples/s\nepoch 1/2: test acc 0.5000\n",
    ]
    reporter.epoch_started(2, 2, batches=500, done=0)
    reporter.epoch_finished("epoch 2/2: test acc 0.6000")
    assert len(notebook.outputs) == 3 and notebook.outputs[2] == "epoch 2/2: test acc 0.6000\n"


def test_a_short_interval_redraws_the_bar_as_the_epoch_goes():
    notebook = _Notebook()
    reporter = NotebookReporter(interval=0.0)
    reporter._display = notebook.display
    reporter.epoch_started(1, 1, batches=4, done=0)
    for done in range(1, 5):
        reporter.batch_done(done, loss=1.0, accuracy=0.25, examples_per_s=10.0)
        assert f"{done}/4" in notebook.outputs[0]
    assert len(notebook.outputs) == 1 and notebook.updates == 4
