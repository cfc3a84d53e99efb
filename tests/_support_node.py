"""Install a pinned npm project in a temporary folder and run its Node scripts, for the interop tests.

Each install goes into a fresh folder, so concurrent test runs never share a ``node_modules``. A missing
Node.js or npm, a failed install, or a package at another version than pinned fails the test, and so
does a script that exits with an error or runs too long.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

INSTALL_TIMEOUT = 300.0
"""Seconds ``npm ci`` may take, downloads included."""

NODE_TIMEOUT = 20.0
"""Seconds a Node script may take to register, to stop or to print its result."""


def install_node_project(
    destination: Path, package_dir: Path, scripts: Iterable[Path], pinned: Mapping[str, str]
) -> Path:
    """Copy ``package.json`` and ``package-lock.json`` of ``package_dir`` and ``scripts`` into
    ``destination``, install with ``npm ci``, check the ``pinned`` versions, and return ``destination``.
    """
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.fail("node and npm must be on PATH to run the Pikku interop tests (Node.js 20 or newer)")

    for name in ("package.json", "package-lock.json"):
        shutil.copy2(package_dir / name, destination / name)
    for script in scripts:
        shutil.copy2(script, destination / script.name)

    # npm ci installs exactly what the lock file lists, and fails if it disagrees with package.json.
    try:
        completed = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=destination,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"npm ci in {destination} timed out after {INSTALL_TIMEOUT:.0f} s")
    if completed.returncode != 0:
        pytest.fail(f"npm ci in {destination} failed with exit code {completed.returncode}:\n{completed.stderr}")

    for package, expected in pinned.items():
        manifest = json.loads((destination / "node_modules" / package / "package.json").read_text())
        assert manifest["version"] == expected, f"npm installed {package} {manifest['version']}, not {expected}"
    return destination


async def run_node_json(project: Path, script: str, *args: str, env: Mapping[str, str] | None = None) -> Any:
    """Run ``script`` of ``project`` to completion and return the JSON it prints on its last stdout line.

    ``env`` is added to this process's environment.
    """
    process = await asyncio.create_subprocess_exec(
        "node",
        script,
        *args,
        cwd=project,
        env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"node {script} did not finish within {NODE_TIMEOUT} s")
    assert process.returncode == 0, f"node {script} exited with {process.returncode}:\n{stderr.decode()}"
    return json.loads(stdout.decode().strip().splitlines()[-1])
