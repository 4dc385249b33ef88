"""Build hook: ship the cluster files and configs inside the package.

``clusters/`` and ``configs/`` stay where a checkout's users (and the docs) expect them; a
wheel carries the same files under ``hybridray/_shipped/`` so that an installed hybridray
(``pip install .``) finds them without a checkout. One copy in the repository, copied at
build time: the two can never drift apart. ``hybridray.shipped`` looks them up.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("clusters", "configs")


class BuildWithShippedFiles(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return           # an editable install reads them from the checkout itself
        for folder in SHIPPED:
            target = Path(self.build_lib) / "hybridray" / "_shipped" / folder
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(__file__).parent / folder, target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithShippedFiles})
