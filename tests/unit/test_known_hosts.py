from pathlib import Path

from mhd.daemon.providers import known_host_key


def test_pin_file_accepts_bare_key_and_known_hosts_lines(tmp_path: Path):
    bare = tmp_path / "bare"
    bare.write_text("ssh-ed25519 AAAAC3Nza comment\n")
    kh = tmp_path / "kh"
    kh.write_text("# pinned\n[gpu1]:2222 ssh-ed25519 AAAAC3Nzb\n")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert known_host_key(bare) == "ssh-ed25519 AAAAC3Nza"
    assert known_host_key(kh) == "ssh-ed25519 AAAAC3Nzb"
    assert known_host_key(empty) is None
