"""What runs on a GPU node imports only what the node's setup installs.

`--infra local` reuses this machine's Python, which has every package, so a missing node
dependency would only show up on a real cloud node: this test reads the imports instead.
"""

import ast
import re
import sys
from pathlib import Path

from gpt2cloud.launch.build import NODE_REQUIREMENTS, tracker_requirements
from gpt2cloud.launch.scripts import SETUP_SCRIPT, render

REPO = Path(__file__).resolve().parent.parent
# what the node's pip line installs, by import name; gpt2cloud's storage layer ships in the wheel
NODE_MODULES = {"torch": "torch", "numpy": "numpy", "tiktoken": "tiktoken", "safetensors": "safetensors",
                "boto3": "boto3", "botocore": "boto3"}


def imported_top_level(path: Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in (tree.body if module_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_model_package_imports_only_what_the_node_installs():
    script = render(SETUP_SCRIPT)
    deps_line = next(line for line in script.splitlines() if line.startswith('DEPS="$GPT2CLOUD_TORCH_SPEC '))
    installed = set(re.findall(r"[A-Za-z0-9_-]+", deps_line.split("$GPT2CLOUD_TORCH_SPEC", 1)[1])) | {"torch"}
    # the install lines install exactly those: torch by its spec, the rest by the same list
    assert f'"${{INSTALL[@]}}" {" ".join(NODE_REQUIREMENTS)}' in script
    assert '"${INSTALL[@]}" "${TORCH_INDEX[@]}" "$GPT2CLOUD_TORCH_SPEC"' in script
    third_party = set()
    for path in (REPO / "model").glob("*.py"):
        third_party |= imported_top_level(path) - set(sys.stdlib_module_names) - {"model", "gpt2cloud"}
    assert third_party, "the scan found no imports at all"
    # a tracker's package (model/trackers.py, imported inside its sink) is installed only for a run that asks
    # for that tracker: the task names it in build.NODE_EXTRAS_ENV
    from model.trackers import TRACKERS

    optional = {kind.module: kind.requirement for kind in TRACKERS.values() if kind.module}
    assert set(tracker_requirements(list(TRACKERS))) == set(optional.values())
    third_party -= set(optional)
    unknown = third_party - set(NODE_MODULES)
    assert not unknown, f"model/ imports {unknown}: install them in the node setup and list them here"
    missing = {NODE_MODULES[m] for m in third_party} - installed
    assert not missing, f"the node setup does not install {missing}"
    # the wheel's metadata names the same packages (pip runs with --no-deps, but the wheel must not lie)
    assert installed == {"torch", *NODE_REQUIREMENTS}


def test_node_side_gpt2cloud_modules_stay_light():
    """model/ imports gpt2cloud's store package on the node, which has no typer/pydantic/skypilot.

    (store/transfer.py imports rich inside its progress bar, which the node never turns on.)
    """
    paths = [REPO / "gpt2cloud" / "__init__.py", *sorted((REPO / "gpt2cloud" / "store").glob("*.py"))]
    assert len(paths) > 3
    for path in paths:
        top = imported_top_level(path, module_level_only=True)
        heavy = top & {"typer", "pydantic", "sky", "rich", "yaml", "boto3", "botocore"}
        assert not heavy, f"{path.relative_to(REPO)} imports {heavy}, which a node does not install"


def test_the_wheel_holds_only_what_the_node_runs():
    import io
    import zipfile

    from gpt2cloud.launch.build import wheel_bytes

    name, data = wheel_bytes()
    files = zipfile.ZipFile(io.BytesIO(data)).namelist()
    code = {f for f in files if not f.startswith("gpt2cloud-")}
    assert {"gpt2cloud/__init__.py", "gpt2cloud/store/__init__.py", "model/train.py", "model/sync.py"} <= code
    assert all(f.startswith(("model/", "gpt2cloud/store/")) or f == "gpt2cloud/__init__.py" for f in code), code
    assert wheel_bytes()[1] == data  # reproducible: the same build, byte for byte
