"""Ships the job folders and the POC project inside the wheel, as ``pharmafl/_resources/{jobs,poc_workspace}``.

``pharmafl.core.paths`` finds them there when no checkout (and no ``PHARMAFL_HOME``) is around.
Everything else about the package is in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent

# poc_workspace/ holds generated workspaces beside the shipped files; ship only what git tracks there.
SHIPPED_POC = ("README.md", "project.yml", "local", "site_local")


class BuildWithResources(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return  # an editable install finds the checkout itself
        target = Path(self.build_lib) / "pharmafl" / "_resources"
        shutil.rmtree(target, ignore_errors=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(HERE / "jobs", target / "jobs", ignore=ignore)
        for name in SHIPPED_POC:
            source = HERE / "poc_workspace" / name
            if source.is_dir():
                shutil.copytree(source, target / "poc_workspace" / name, ignore=ignore)
            else:
                (target / "poc_workspace").mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / "poc_workspace" / name)


setup(cmdclass={"build_py": BuildWithResources})
