"""What a worker running as its task's owner reads (gateway/reconcile/owner_worker.py,
core/config.py for_owner): the site's configuration without its secrets, the owner's own
storage settings file merged in as that owner, an image cache of the owner's own."""

from __future__ import annotations

import json
import pwd
import shutil
import textwrap
import time

import pytest

from funnel_hpc.core import config as config_mod
from funnel_hpc.gateway.reconcile.owner_worker import check_worker_command, owner_sections
from tests.owner_helpers import as_user, drop_user, make_user, need_root, open_dir, readable_install

SECRETS = {"s3": {"access_key_id": "K-ID", "secret_access_key": "K-SECRET", "profile": "p",
                  "endpoints": {"arch": {"access_key_id": "E-ID", "secret_access_key": "E-S",
                                         "buckets": ["arch-*"]}}},
           "gs": {"credentials_file": "/etc/funnel/gcs.json"},
           "http": {"headers": {"data.example.org": {"Authorization": "Bearer H"}}}}


def site_config(**worker) -> config_mod.Config:
    return config_mod.load(environ={}, overrides={
        "backend": {"name": "slurm", "slurm": {"submit_as_owner": True}},
        "storage": SECRETS,
        "worker": {"registries": {"r.example.org": {"username": "u", "password": "R-PW",
                                                    "ca_file": "/etc/ca.pem"}}, **worker}})


def test_owner_sections_leave_out_every_site_secret():
    sections = owner_sections(site_config())
    text = json.dumps(sections)
    for secret in ("K-ID", "K-SECRET", "E-ID", "E-S", "Bearer H", "R-PW", "gcs.json"):
        assert secret not in text, secret
    # the rest is there: an owner's profile, endpoint routing, registry CA, other settings
    assert sections["storage"]["s3"]["profile"] == "p"
    assert sections["storage"]["s3"]["endpoints"]["arch"]["buckets"] == ["arch-*"]
    assert sections["worker"]["registries"]["r.example.org"]["ca_file"] == "/etc/ca.pem"
    assert sections["owner_storage_file"] == "~/.config/funnel/storage.yaml"
    assert sections["worker"]["image_cache"] == "~/.cache/funnel-hpc/images"
    assert owner_sections(site_config(image_cache="/scratch/images"))["worker"][
        "image_cache"] == "/scratch/images"  # the site's choice stays


def test_the_owners_storage_file_is_merged_as_the_owner(tmp_path):
    """The per-task config, read by a worker running as the owner: "~" is the owner's home,
    their storage.yaml brings their keys, the FUNNEL_ environment still wins."""
    need_root()
    alice = make_user("s")
    install, task = open_dir("own-cfg-install-"), open_dir("own-cfg-task-")
    try:
        python = readable_install(install)
        home = pwd.getpwnam(alice).pw_dir
        mine = task / "worker-config.json"
        mine.write_text(json.dumps(owner_sections(site_config())))
        probe = textwrap.dedent("""
            import json, sys
            from funnel_hpc.core.config import load_worker, plain
            config = load_worker(sys.argv[1])
            print(json.dumps([plain(config.storage.s3), config.worker.image_cache]))
        """)
        ran = as_user(alice, str(python), "-c", probe, str(mine))
        assert ran.returncode == 0, ran.stderr
        s3, cache = json.loads(ran.stdout)
        assert (s3["access_key_id"], cache) == ("", f"{home}/.cache/funnel-hpc/images")
        own = f"{home}/.config/funnel/storage.yaml"
        assert as_user(alice, "mkdir", "-p", f"{home}/.config/funnel").returncode == 0
        written = as_user(alice, "sh", "-c", f"cat > {own}",
                          input="storage:\n  s3:\n    access_key_id: ALICE-ID\n"
                                "    secret_access_key: ALICE-SECRET\n")
        assert written.returncode == 0, written.stderr
        ran = as_user(alice, str(python), "-c", probe, str(mine))
        assert ran.returncode == 0, ran.stderr
        s3, _ = json.loads(ran.stdout)
        assert (s3["access_key_id"], s3["secret_access_key"]) == ("ALICE-ID", "ALICE-SECRET")
        ran = as_user(alice, "env", "FUNNEL_STORAGE__S3__ACCESS_KEY_ID=FROM-ENV", str(python),
                      "-c", probe, str(mine))
        assert json.loads(ran.stdout)[0]["access_key_id"] == "FROM-ENV"
        # only storage: the file cannot widen the worker's own settings
        as_user(alice, "sh", "-c", f"cat > {own}", input="worker:\n  allowed_dirs: [/]\n")
        ran = as_user(alice, str(python), "-c", probe, str(mine))
        assert ran.returncode != 0 and "may hold only a storage: mapping" in ran.stderr
    finally:
        drop_user(alice)
        shutil.rmtree(install, ignore_errors=True)
        shutil.rmtree(task, ignore_errors=True)


def test_a_storage_file_with_unknown_keys_is_named(tmp_path):
    own = tmp_path / "storage.yaml"
    own.write_text("storage:\n  s3:\n    no_such_key: 1\n")
    config = {**config_mod.worker_sections(config_mod.load(environ={})),
              "owner_storage_file": str(own)}
    with pytest.raises(config_mod.ConfigError, match="storage.s3.no_such_key"):
        config_mod.for_owner(config)


def test_the_start_check_needs_root_and_a_command_nobody_can_run(tmp_path):
    need_root()
    install = open_dir("own-check-install-")
    try:
        python = readable_install(install)
        probe = ("from funnel_hpc.gateway.reconcile.owner_worker import "
                 "check_worker_command as check; check(['/bin/true'])")
        ran = as_user("nobody", str(python), "-c", probe)
        assert ran.returncode != 0
        assert "the reconciler must run as root" in ran.stderr and "uid 65534" in ran.stderr
        # as root: the readable install passes, in about a Python start
        started = time.monotonic()
        check_worker_command([str(python), "-m", "funnel_hpc.worker", "run"])
        print(f"start check: {time.monotonic() - started:.2f} s")
    finally:
        shutil.rmtree(install, ignore_errors=True)
