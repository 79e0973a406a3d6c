"""Every file of the `deepimaging` package reaches an installed extension and a pip install.

Inside Slicer the library is the copy the extension build installs (DeepImagingCommon's
CMake globs); outside, pip installs it with pyproject's package-data.  A data file missed by
either (the shipped Z-Net weights once were) breaks the installed module while every test of
the source tree passes.  The Slicer-like tests (Testing/slicerlike) then run the module paths
from that install tree and fail if anything opens a file of the source tree instead.
"""

import fnmatch
import re
import subprocess

from cmakelists import REPO, installed_files


def package_files():
    """Files of the package as git tracks them (what a clean clone, and CI, has)."""
    listed = subprocess.run(["git", "ls-files", "deepimaging"], cwd=REPO, capture_output=True, text=True, check=True)
    files = [line for line in listed.stdout.splitlines() if line and "__pycache__" not in line]
    assert files, "git lists no file under deepimaging/"
    return files


def test_cmake_installs_every_file_of_the_package():
    installed = set(installed_files())
    missing = [path for path in package_files() if path not in installed]
    assert not missing, ("DeepImagingCommon/CMakeLists.txt does not install these package files, so an installed "
                         f"extension lacks them: {missing}; add their extension to DEEPIMAGING_PYTHON_RESOURCES")


def test_pip_package_data_covers_every_data_file():
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"\[tool\.setuptools\.package-data\]\s*deepimaging\s*=\s*\[([^\]]*)\]", text)
    assert block, "pyproject.toml needs [tool.setuptools.package-data] deepimaging = [...]"
    patterns = re.findall(r'"([^"]+)"', block.group(1))
    for path in package_files():
        if not path.endswith(".py"):
            inside = path.split("/", 1)[1]
            assert any(fnmatch.fnmatch(inside, p) or fnmatch.fnmatch(inside.split("/")[-1], p.split("/")[-1])
                       for p in patterns), f"{path} is not in pyproject's package-data {patterns}"


def test_the_shipped_weights_are_installed():
    files = installed_files()
    for name in ("znet_default.pt", "znet_paper.pt"):  # robust training (default) and paper training
        assert files[f"deepimaging/nirst/weights/{name}"].is_file()
