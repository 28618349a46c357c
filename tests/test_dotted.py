"""`dotted.import_function`: a function named `package.module:function`, or one line why not."""

from __future__ import annotations

import pytest

from ninlab.dotted import import_function
from ninlab.errors import NinlabError


def test_a_module_that_exits_when_imported_is_one_line(tmp_path) -> None:
    # A training script named as the model's file: its argparse or sys.exit at import ended
    # ninlab with the script's own exit status and no word of why.
    script = tmp_path / "train_script.py"
    script.write_text("import sys\nsys.exit(3)\ndef model():\n    pass\n")
    with pytest.raises(NinlabError) as refused:
        import_function(f"{script}:model", what="model", expects="a function")
    assert str(refused.value) == (
        f"importing '{script}' for model '{script}:model' exited (SystemExit: 3): it runs a "
        "program when imported (parses its command line, trains); put that under "
        "if __name__ == '__main__':"
    )
