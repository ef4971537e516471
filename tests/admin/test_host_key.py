"""The SSH host key: Ed25519, made once with mode 0600, never made again."""

import os
import stat
import subprocess
import shutil

import pytest
from twisted.conch.ssh import keys

from appliance.admin.ssh import ensure_host_key


def fingerprint(key):
    return key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)


def test_made_once_0600_and_the_same_key_after_a_restart(tmp_path):
    path = tmp_path / "ssh" / "ssh_host_ed25519_key"
    key = ensure_host_key(str(path))
    assert key.sshType() == b"ssh-ed25519"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    written = path.read_bytes()
    again = ensure_host_key(str(path))              # the next start
    assert fingerprint(again) == fingerprint(key) and path.read_bytes() == written


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="needs ssh-keygen")
def test_the_file_is_openssh_format(tmp_path):
    path = tmp_path / "ssh_host_ed25519_key"
    key = ensure_host_key(str(path))
    listed = subprocess.run(["ssh-keygen", "-lf", str(path)], capture_output=True,
                            text=True, timeout=30, check=True).stdout
    assert "SHA256:" + fingerprint(key).rstrip("=") in listed and "(ED25519)" in listed


def test_an_unreadable_key_is_not_replaced(tmp_path):
    path = tmp_path / "ssh_host_ed25519_key"
    path.write_bytes(b"not a key\n")
    with pytest.raises(ValueError, match="not an SSH private key"):
        ensure_host_key(str(path))
    assert path.read_bytes() == b"not a key\n"
