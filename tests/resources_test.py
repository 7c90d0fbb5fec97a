"""The shipped files are found in a checkout and in a wheel install alike."""

import json
import os
import shutil
import subprocess
import sys

from cai_jax import constitution, main, plan, prompt_sets, resources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_checkout_serves_its_own_files():
  assert resources.RESOURCE_ROOT == REPO and resources.IMPORT_ROOT == REPO
  for name in resources.RESOURCE_DIRS:
    assert os.path.isdir(os.path.join(resources.RESOURCE_ROOT, name)), name
  assert main.GIN_DIR == os.path.join(REPO, "gin")
  assert os.path.isfile(os.path.join(plan.PRESET_DIR, "tiny.gin"))
  assert os.path.isfile(os.path.join(constitution.DEFAULT_PATH, constitution.CONSTITUTION_FILE))
  assert os.path.isdir(prompt_sets.PROMPTS_DIR)


def test_a_wheel_install_carries_the_presets_constitution_and_data(tmp_path):
  """Build a wheel from a copy of the checkout, install it into a bare directory, and run
  the CLI from elsewhere: presets, the default constitution and the shipped data load."""
  src = tmp_path / "src"
  shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
      ".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path / "wheel"), str(src)], check=True, capture_output=True)
  wheel, = (tmp_path / "wheel").glob("cai_jax-*.whl")
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                  str(wheel)], check=True, capture_output=True)
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  run = tmp_path / "elsewhere"
  run.mkdir()
  probe = ("import json, os, cai_jax\n"
           "from cai_jax import constitution, data, resources\n"
           "c = constitution.load_default()\n"
           "rows = data.read_jsonl(data.resolve_path('data/tiny_chat.jsonl'))\n"
           "print(json.dumps({'package': cai_jax.__file__, 'root': resources.RESOURCE_ROOT,\n"
           "                  'critiques': len(c.critique_revision), 'rows': len(rows)}))\n")
  out = subprocess.run([sys.executable, "-c", probe], cwd=run, env=env, check=True,
                       capture_output=True, text=True).stdout
  got = json.loads(out.strip().splitlines()[-1])
  assert got["package"].startswith(str(site)) and got["root"] == str(site / "cai_jax" / "_resources")
  assert got["critiques"] > 0 and got["rows"] > 0
  info = subprocess.run([sys.executable, "-m", "cai_jax.main", "info", "--gin_file=models/tiny.gin"],
                        cwd=run, env=env, capture_output=True, text=True)
  assert info.returncode == 0, info.stderr[-2000:]
  assert json.loads(info.stdout.strip().splitlines()[-1])["params"] == 115008
