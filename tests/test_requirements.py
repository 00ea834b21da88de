"""The requirement files agree with each other: a package named in several of them (requirements.txt's
ranges, constraints.txt's exact pins for CI, the benchmark peers' environments that install
requirements.txt too) has one version that all of them accept, so `pip install -r` of any of them resolves."""

import glob
import os

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT


def requirement_files():
    names = ["requirements.txt", "constraints.txt", "requirements-test.txt", "requirements-examples.txt"]
    paths = [os.path.join(ROOT, name) for name in names] + sorted(
        glob.glob(os.path.join(ROOT, "benchmarks", "requirements-*.txt"))
    )
    return {os.path.relpath(path, ROOT): open(path).read() for path in paths if os.path.exists(path)}


# The two peer environments exist because TRL's PPOTrainer and its GRPO/RLOO trainers need different trl
# releases: trl is the one package they may pin apart (never installed together).
APART = {frozenset({"benchmarks/requirements-peers.txt", "benchmarks/requirements-peers-trl116.txt"}): {"trl"}}


def conflicts(files: dict, apart=APART) -> list:
    """Each file's text by its name -> one line per disagreement: a version pinned (==) in one file that
    another file's specifier for the same package rejects (two different pins included), except for
    the packages `apart` lets a pair of files pin differently."""
    specifiers = {}  # package -> [(file, SpecifierSet)]
    for name, text in files.items():
        for line in text.splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):  # -r and -c name files, not packages
                requirement = Requirement(line)
                specifiers.setdefault(canonicalize_name(requirement.name), []).append((name, requirement.specifier))
    found = []
    for package, entries in sorted(specifiers.items()):
        pins = [(name, Version(s.version)) for name, spec in entries for s in spec if s.operator == "=="]
        for pinned_in, version in pins:
            for name, spec in entries:
                if package not in apart.get(frozenset({pinned_in, name}), ()) and not spec.contains(
                    version, prereleases=True
                ):
                    found.append(f"{package}: {pinned_in} pins {version}, which {name} rejects ({spec})")
    return found


def test_every_package_in_several_requirement_files_has_one_version_they_all_accept():
    files = requirement_files()
    assert {"requirements.txt", "constraints.txt", "benchmarks/requirements-peers.txt"} <= set(files)
    assert conflicts(files) == []


def test_the_check_catches_a_pin_outside_a_range_and_two_different_pins():
    files = {
        "requirements.txt": "-r other.txt\ntransformers>=5.24,<5.25  # why\nNumPy>=1.26\n",
        "peers.txt": "transformers==5.23.0\nnumpy==2.4.6\n",
        "constraints.txt": "numpy==2.4.5\n",
        "other-peers.txt": "transformers==5.24.1\n",
    }
    assert conflicts(files, apart={frozenset({"peers.txt", "other-peers.txt"}): {"transformers"}}) == [
        "numpy: peers.txt pins 2.4.6, which constraints.txt rejects (==2.4.5)",
        "numpy: constraints.txt pins 2.4.5, which peers.txt rejects (==2.4.6)",
        "transformers: peers.txt pins 5.23.0, which requirements.txt rejects (<5.25,>=5.24)",
    ]
