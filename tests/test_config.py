"""Tests of supermachine_jupyter.config: validation messages, builder, (de)serialisation."""

import json
import os
import re

import pytest
from traitlets import TraitError

from supermachine_jupyter.config import (
    ENGINES,
    FIELDS,
    AssetPaths,
    MountSpec,
    VmConfig,
    VolumeSpec,
    host_cpu_count,
    host_memory_mib,
)

# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def share(tmp_path):
    """An existing host directory to mount."""
    path = tmp_path / "share"
    path.mkdir()
    return path


@pytest.fixture
def assets(tmp_path):
    kernel = tmp_path / "bzImage"
    initrd = tmp_path / "initrd.cpio.gz"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    return AssetPaths(kernel, initrd)


@pytest.fixture
def full_config(tmp_path, share, assets):
    """A config with every field set away from its default."""
    return (
        VmConfig()
        .with_memory_mib(256)
        .with_vcpus(1)
        .with_balloon()
        .with_volume(tmp_path / "data.img", "/data", size_mib=64)
        .with_volume(tmp_path / "scratch.img", "/scratch", read_only=True)
        .with_virtiofs(share, "share", "/mnt/share", read_only=True)
        .with_assets(assets)
        .with_vsock_mux_dir(tmp_path)
        .with_restore_timeout(2.5)
        .with_engine("qemu")
        .with_name("lab1")
    )


def raises_naming(field, *fragments):
    """pytest.raises(TraitError) whose message must contain ``field`` and every fragment."""
    pattern = "".join(f"(?=[\\s\\S]*{re.escape(part)})" for part in (field, *fragments))
    return pytest.raises(TraitError, match=pattern)


# --- memory_mib -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 0, 63, host_memory_mib() + 1, 10**12])
def test_memory_mib_out_of_range_names_field_and_range(bad):
    with raises_naming("VmConfig.memory_mib", "from 64 to", "MiB (host RAM)", f"got {bad}"):
        VmConfig(memory_mib=bad)


@pytest.mark.parametrize("bad", [True, False, 512.0, "512"])
def test_memory_mib_rejects_non_integers_including_bool(bad):
    with raises_naming("VmConfig.memory_mib", "None or an integer", f"got {bad!r}"):
        VmConfig(memory_mib=bad)


def test_memory_mib_accepts_bounds_and_none():
    assert VmConfig(memory_mib=64).memory_mib == 64
    assert VmConfig(memory_mib=host_memory_mib()).memory_mib == host_memory_mib()
    assert VmConfig().memory_mib is None
    assert VmConfig(memory_mib=512).with_memory_mib(None).memory_mib is None


def test_memory_mib_message_states_host_ram():
    with pytest.raises(TraitError) as info:
        VmConfig(memory_mib=0)
    assert str(info.value) == (
        f"VmConfig.memory_mib must be None or an integer from 64 to {host_memory_mib()} "
        "MiB (host RAM), got 0"
    )


def test_assignment_is_validated_and_failed_assignment_keeps_old_value():
    config = VmConfig(memory_mib=512)
    with raises_naming("VmConfig.memory_mib"):
        config.memory_mib = 1
    assert config.memory_mib == 512
    config.memory_mib = 1024
    assert config.memory_mib == 1024


# --- vcpus ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -2, host_cpu_count() + 1])
def test_vcpus_out_of_range_names_field_and_range(bad):
    with raises_naming("VmConfig.vcpus", f"from 1 to {host_cpu_count()}", f"got {bad}"):
        VmConfig(vcpus=bad)


def test_vcpus_rejects_bool():
    with raises_naming("VmConfig.vcpus", "got True"):
        VmConfig().with_vcpus(True)


def test_vcpus_accepts_host_cpu_count():
    assert VmConfig(vcpus=host_cpu_count()).vcpus == host_cpu_count()


# --- balloon ----------------------------------------------------------------------------------


def test_balloon_is_strictly_bool():
    assert VmConfig().balloon is False
    assert VmConfig().with_balloon().balloon is True
    assert VmConfig(balloon=True).with_balloon(False).balloon is False
    with raises_naming("VmConfig.balloon", "True or False", "got 1"):
        VmConfig(balloon=1)


# --- guest paths (shared by volumes and mounts) -----------------------------------------------


@pytest.mark.parametrize("bad", ["data", "", "/", "//", "/data/../etc", "/..", "/da\0ta", None, 5])
def test_volume_guest_path_must_be_absolute_normalised(tmp_path, bad):
    with raises_naming("VolumeSpec.guest_path", "absolute guest path other than '/'", "'..'"):
        VolumeSpec(tmp_path / "v.img", bad)


@pytest.mark.parametrize("bad", ["mnt", "/", "/mnt/../x"])
def test_mount_guest_path_must_be_absolute_normalised(share, bad):
    with raises_naming("MountSpec.guest_path", "absolute guest path", f"got {bad!r}"):
        MountSpec(share, "tag", bad)


@pytest.mark.parametrize("bad", ["/my data", "/a,b", "/a:b", "/tab\there", "/new\nline",
                                 "/caf\u00e9", "/quote'", '/dq"', "/" + "x" * 128])
def test_guest_path_characters_that_would_break_the_guest_command_line(tmp_path, share, bad):
    # init reads "sm.vol=SERIAL:PATH:rw,..." from the kernel command line: a space, ',' or ':'
    # would mount somewhere else (or fail at boot), so they are refused here, naming the field.
    with raises_naming("VolumeSpec.guest_path", "A-Z a-z 0-9 / . _ - + @ ~", f"got {bad!r}"):
        VolumeSpec(tmp_path / "v.img", bad)
    with raises_naming("MountSpec.guest_path", "at most 128 characters"):
        MountSpec(share, "tag", bad)


def test_guest_path_plain_alphabet_is_accepted(tmp_path):
    path = "/srv/My-data_2.0+x@host~" + "y" * 100
    assert VolumeSpec(tmp_path / "v.img", path).guest_path == path


def test_guest_path_is_stored_canonical(tmp_path):
    assert VolumeSpec(tmp_path / "v.img", "//data/./sub/").guest_path == "/data/sub"


# --- VolumeSpec -------------------------------------------------------------------------------


def test_volume_host_path_stored_absolute_and_file_may_not_exist_yet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = VolumeSpec("new.img", "/data")
    assert spec.host_path == str(tmp_path / "new.img")
    assert not os.path.exists(spec.host_path)


def test_volume_host_path_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert VolumeSpec("~/v.img", "/data").host_path == str(tmp_path / "v.img")


def test_volume_with_missing_host_dir(tmp_path):
    with raises_naming("VolumeSpec.host_path", "directory exists", "directory does not exist"):
        VolumeSpec(tmp_path / "missing" / "v.img", "/data")


def test_volume_host_path_that_is_a_directory(tmp_path):
    with raises_naming("VolumeSpec.host_path", "(a directory)"):
        VolumeSpec(tmp_path, "/data")


@pytest.mark.parametrize("bad", [0, -1, 1024 * 1024 + 1, True, 1.5])
def test_volume_size_mib_range(tmp_path, bad):
    with raises_naming("VolumeSpec.size_mib", "from 1 to 1048576 MiB (1 TiB)", f"got {bad!r}"):
        VolumeSpec(tmp_path / "v.img", "/data", size_mib=bad)


def test_volume_size_bounds_accepted(tmp_path):
    assert VolumeSpec(tmp_path / "v.img", "/data", size_mib=1).size_mib == 1
    assert VolumeSpec(tmp_path / "v.img", "/data", size_mib=1024 * 1024).size_mib == 1024 * 1024
    # None: the existing file's size, or 1024 MiB for a new one (volumes.prepare)
    assert VolumeSpec(tmp_path / "v.img", "/data").size_mib is None
    assert VolumeSpec(tmp_path / "v.img", "/data", size_mib=None).size_mib is None


def test_volume_read_only_must_be_bool(tmp_path):
    with raises_naming("VolumeSpec.read_only", "True or False"):
        VolumeSpec(tmp_path / "v.img", "/data", read_only="yes")


def test_specs_are_immutable(tmp_path):
    spec = VolumeSpec(tmp_path / "v.img", "/data")
    with pytest.raises(AttributeError):
        spec.size_mib = 5


def test_at_most_twenty_volumes(tmp_path):
    specs = [VolumeSpec(tmp_path / f"v{i}.img", f"/v{i}") for i in range(21)]
    assert len(VmConfig(volumes=specs[:20]).volumes) == 20
    with raises_naming("VmConfig.volumes", "at most 20", "(21 volumes)"):
        VmConfig(volumes=specs)


def test_volumes_must_hold_volume_specs(share):
    with raises_naming("VmConfig.volumes", "a list of at most 20 VolumeSpec", "got 'abc'"):
        VmConfig(volumes="abc")
    with raises_naming("VmConfig.volumes", "VolumeSpec"):
        VmConfig(volumes=[MountSpec(share, "t", "/m")])


def test_two_volumes_on_one_host_file_are_refused(tmp_path):
    config = VmConfig().with_volume(tmp_path / "v.img", "/a")
    with raises_naming("VmConfig.volumes", "host file", "volumes[0] and volumes[1]"):
        config.with_volume(tmp_path / "v.img", "/b")


# --- MountSpec --------------------------------------------------------------------------------


def test_mount_missing_host_dir(tmp_path):
    with raises_naming("MountSpec.host_path", "an existing host directory", "(does not exist)"):
        MountSpec(tmp_path / "nope", "tag", "/mnt")


def test_mount_host_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with raises_naming("MountSpec.host_path", "an existing host directory", "(not a directory)"):
        MountSpec(tmp_path / "file", "tag", "/mnt")


def test_mount_host_path_stored_absolute(share, monkeypatch):
    monkeypatch.chdir(share.parent)
    assert MountSpec("share", "t", "/m").host_path == str(share)


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "ä", "x.y", "t" * 37, None])
def test_mount_tag_chars_and_length(share, bad):
    with raises_naming("MountSpec.tag", "1 to 36 characters from A-Z a-z 0-9 _ -", f"got {bad!r}"):
        MountSpec(share, bad, "/mnt")


def test_mount_tag_of_36_chars_is_fine(share):
    assert MountSpec(share, "A_-9" * 9, "/mnt").tag == "A_-9" * 9


def test_duplicate_tag(share, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    config = VmConfig().with_virtiofs(share, "t", "/a")
    with raises_naming("VmConfig.mounts", "tag 't'", "mounts[0] and mounts[1]", "unique"):
        config.with_virtiofs(other, "t", "/b")


def test_duplicate_guest_path_volume_vs_mount(tmp_path, share):
    config = VmConfig().with_volume(tmp_path / "v.img", "/data")
    with raises_naming("VmConfig.mounts", "guest path '/data'", "volumes[0] and mounts[0]"):
        config.with_virtiofs(share, "t", "/data/")  # canonical spelling collides too


def test_duplicate_guest_path_mount_vs_volume_set_together(tmp_path, share):
    with raises_naming("VmConfig.", "guest path '/d'", "volumes[0]", "mounts[0]"):
        VmConfig(
            volumes=[VolumeSpec(tmp_path / "v.img", "/d")], mounts=[MountSpec(share, "t", "/d")]
        )


def test_duplicate_guest_path_when_assigning_volumes(tmp_path, share):
    config = VmConfig().with_virtiofs(share, "t", "/d")
    with raises_naming("VmConfig.volumes", "guest path '/d'", "unique across volumes and mounts"):
        config.volumes = [VolumeSpec(tmp_path / "v.img", "/d")]
    assert config.volumes == []


# --- assets -----------------------------------------------------------------------------------


def test_assets_missing_kernel(tmp_path):
    (tmp_path / "initrd").write_bytes(b"")
    with raises_naming("AssetPaths.kernel", "an existing file", "(does not exist)"):
        AssetPaths(tmp_path / "bzImage", tmp_path / "initrd")


def test_assets_missing_initrd(tmp_path):
    (tmp_path / "bzImage").write_bytes(b"")
    with raises_naming("AssetPaths.initrd", "an existing file", "(does not exist)"):
        VmConfig().with_assets(tmp_path / "bzImage", tmp_path / "initrd")


def test_assets_directory_is_not_a_file(tmp_path):
    (tmp_path / "initrd").write_bytes(b"")
    with raises_naming("AssetPaths.kernel", "(not a file)"):
        AssetPaths(tmp_path, tmp_path / "initrd")


def test_assets_field_type_and_reset(assets):
    with raises_naming("VmConfig.assets", "None (auto-discover) or an AssetPaths"):
        VmConfig(assets="/boot/vmlinuz")
    config = VmConfig().with_assets(assets)
    assert config.assets == assets
    assert config.with_assets(None).assets is None
    assert VmConfig().with_assets(assets.kernel, assets.initrd).assets == assets


# --- vsock_mux_dir ----------------------------------------------------------------------------


def test_vsock_mux_dir_defaults_to_tmpdir(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert VmConfig().vsock_mux_dir == str(tmp_path)


def test_vsock_mux_dir_default_falls_back_when_tmpdir_unusable(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    path = VmConfig().vsock_mux_dir
    assert path != str(tmp_path / "missing")
    assert os.path.isdir(path) and len(path) <= 80


def test_vsock_mux_dir_must_exist(tmp_path):
    with raises_naming("VmConfig.vsock_mux_dir", "an existing directory", "(does not exist)"):
        VmConfig(vsock_mux_dir=str(tmp_path / "missing"))


def test_vsock_mux_dir_must_be_a_directory(tmp_path):
    (tmp_path / "f").write_text("")
    with raises_naming("VmConfig.vsock_mux_dir", "(not a directory)"):
        VmConfig().with_vsock_mux_dir(tmp_path / "f")


def test_vsock_mux_dir_too_long(tmp_path):
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    with raises_naming("VmConfig.vsock_mux_dir", "at most 80 bytes", "sun_path", "too long"):
        VmConfig(vsock_mux_dir=str(deep))


def test_vsock_mux_dir_empty_or_wrong_type():
    with raises_naming("VmConfig.vsock_mux_dir", "an existing directory", "got ''"):
        VmConfig(vsock_mux_dir="")
    with raises_naming("VmConfig.vsock_mux_dir", "got 5"):
        VmConfig(vsock_mux_dir=5)


def test_vsock_mux_dir_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    assert VmConfig(vsock_mux_dir=tmp_path.name).vsock_mux_dir == str(tmp_path)


# --- restore_timeout --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, 3600.5, float("nan"), float("inf"), True, "10"])
def test_restore_timeout_range(bad):
    with raises_naming("VmConfig.restore_timeout", "greater than 0 and at most 3600"):
        VmConfig(restore_timeout=bad)


def test_restore_timeout_accepts_int_as_float():
    assert VmConfig().restore_timeout == 10.0
    config = VmConfig(restore_timeout=3600)
    assert config.restore_timeout == 3600.0 and isinstance(config.restore_timeout, float)


# --- engine and name --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["kvm", "", "QEMU", None])
def test_unknown_engine(bad):
    with raises_naming("VmConfig.engine", "one of 'auto', 'native', 'qemu'", f"got {bad!r}"):
        VmConfig(engine=bad)


def test_engines():
    assert VmConfig().engine == "auto"
    assert [VmConfig().with_engine(e).engine for e in ENGINES] == list(ENGINES)


@pytest.mark.parametrize("bad", ["", "-lab", ".x", "has space", "a/b", "x" * 64, 3])
def test_bad_name(bad):
    with raises_naming("VmConfig.name", "a letter or digit", f"got {bad!r}"):
        VmConfig(name=bad)


def test_good_names():
    assert VmConfig(name="lab1").name == "lab1"
    assert VmConfig(name="A" + "b_.-" * 15 + "cc").name.startswith("A")  # 63 chars
    assert VmConfig(name="x").with_name(None).name is None


# --- construction, builder, equality, repr ----------------------------------------------------


def test_keyword_construction_equals_builder():
    assert VmConfig(memory_mib=512, vcpus=1) == VmConfig().with_memory_mib(512).with_vcpus(1)


def test_unknown_keyword_is_a_type_error_listing_fields():
    with pytest.raises(TypeError, match="'memory'.*the fields are: memory_mib, vcpus, balloon"):
        VmConfig(memory=512)
    with pytest.raises(TypeError, match="'cpus'"):
        VmConfig().replace(cpus=2)


def test_positional_arguments_are_refused():
    with pytest.raises(TypeError):
        VmConfig(512)


def test_builder_returns_new_objects_and_leaves_original_untouched(tmp_path, share, assets):
    original = VmConfig(memory_mib=128)
    before = original.to_dict()
    steps = [
        original.with_memory_mib(256),
        original.with_vcpus(1),
        original.with_balloon(),
        original.with_volume(tmp_path / "v.img", "/data"),
        original.with_virtiofs(share, "t", "/mnt"),
        original.with_assets(assets),
        original.with_vsock_mux_dir(tmp_path),
        original.with_restore_timeout(1),
        original.with_engine("native"),
        original.with_name("x"),
        original.replace(memory_mib=64),
    ]
    for step in steps:
        assert step is not original
        assert step != original
        assert step.memory_mib in (128, 256, 64)
    assert original.to_dict() == before
    assert original.volumes == [] and original.mounts == []


def test_builder_accepts_spec_objects(tmp_path, share):
    volume = VolumeSpec(tmp_path / "v.img", "/data", size_mib=8)
    mount = MountSpec(share, "t", "/mnt", read_only=True)
    config = VmConfig().with_volume(volume).with_virtiofs(mount)
    assert config.volumes == [volume] and config.mounts == [mount]
    with pytest.raises(TypeError, match="not both"):
        VmConfig().with_volume(volume, "/other")


def test_builder_chain_appends_volumes_in_order(tmp_path):
    config = VmConfig().with_volume(tmp_path / "a.img", "/a").with_volume(tmp_path / "b.img", "/b")
    assert [v.guest_path for v in config.volumes] == ["/a", "/b"]


def test_volume_list_is_copied_from_caller(tmp_path):
    specs = [VolumeSpec(tmp_path / "a.img", "/a")]
    config = VmConfig(volumes=specs)
    specs.append(VolumeSpec(tmp_path / "b.img", "/b"))
    assert len(config.volumes) == 1


def test_equality(full_config, tmp_path):
    assert full_config == VmConfig.from_dict(full_config.to_dict())
    assert full_config != full_config.with_vcpus(None)
    assert VmConfig() == VmConfig()
    assert VmConfig() != {"memory_mib": None}
    with pytest.raises(TypeError):
        hash(VmConfig())


def test_repr_shows_non_default_fields_and_engine(tmp_path):
    assert repr(VmConfig()) == "VmConfig(engine='auto')"
    config = VmConfig(memory_mib=512, vcpus=1, name="lab1")
    text = repr(config.with_volume(tmp_path / "v.img", "/data"))
    assert text.startswith("VmConfig(memory_mib=512, vcpus=1, volumes=[VolumeSpec(")
    assert "guest_path='/data'" in text and "name='lab1'" in text and "engine='auto'" in text
    assert "balloon" not in text and "restore_timeout" not in text and "mounts" not in text


def test_observers_see_assignments():
    config = VmConfig()
    seen = []
    config.observe(lambda change: seen.append(change["new"]), names="vcpus")
    config.vcpus = 1
    assert seen == [1]


# --- serialisation ----------------------------------------------------------------------------


def test_to_dict_has_every_field_and_is_json_serialisable(full_config):
    data = full_config.to_dict()
    assert list(data) == list(FIELDS)
    assert data["volumes"][0] == {
        "host_path": full_config.volumes[0].host_path,
        "guest_path": "/data",
        "size_mib": 64,
        "read_only": False,
    }
    assert data["mounts"][0]["tag"] == "share"
    assets = full_config.assets
    assert data["assets"] == {"kernel": assets.kernel, "initrd": assets.initrd}
    assert json.loads(json.dumps(data)) == data


def test_dict_and_json_round_trip_exactly(full_config):
    again = VmConfig.from_dict(full_config.to_dict())
    assert again == full_config
    assert again.to_dict() == full_config.to_dict()
    from_json = VmConfig.from_json(full_config.to_json(indent=2))
    assert from_json == full_config
    assert from_json.to_json() == full_config.to_json()
    assert isinstance(from_json.restore_timeout, float) and from_json.restore_timeout == 2.5


def test_default_round_trip():
    assert VmConfig.from_json(VmConfig().to_json()) == VmConfig()


def test_from_dict_fills_missing_fields_with_defaults():
    config = VmConfig.from_dict({"memory_mib": 128})
    assert config == VmConfig(memory_mib=128)


def test_from_dict_unknown_key():
    with raises_naming("'memory'", "unknown field", "the fields are: memory_mib"):
        VmConfig.from_dict({"memory": 512})


def test_from_dict_unknown_key_in_nested_spec(full_config):
    data = full_config.to_dict()
    data["mounts"][0]["dax"] = True
    with raises_naming("MountSpec", "'dax'", "fields are host_path, tag, guest_path, read_only"):
        VmConfig.from_dict(data)


def test_from_dict_validates_values(full_config):
    data = full_config.to_dict()
    data["volumes"][1]["guest_path"] = "relative"
    with raises_naming("VolumeSpec.guest_path"):
        VmConfig.from_dict(data)
    with raises_naming("VmConfig.vcpus"):
        VmConfig.from_dict({"vcpus": 0})
    with raises_naming("VmConfig.volumes", "list"):
        VmConfig.from_dict({"volumes": "x"})
    with raises_naming("VolumeSpec", "needs host_path, guest_path"):
        VmConfig.from_dict({"volumes": [{"size_mib": 5}]})


def test_from_json_rejects_garbage():
    with raises_naming("VmConfig.from_json", "not valid JSON"):
        VmConfig.from_json("{")
    with raises_naming("VmConfig.from_dict", "dict of fields"):
        VmConfig.from_json("[1, 2]")
    with raises_naming("VmConfig.from_json", "nested too deeply"):
        VmConfig.from_json("[" * 200_000 + "]" * 200_000)
    with raises_naming("VmConfig.from_json", "not valid JSON"):
        VmConfig.from_json(None)


# --- field listing and help -------------------------------------------------------------------


def test_fields_are_exactly_the_traits():
    assert VmConfig.fields() == FIELDS
    assert sorted(FIELDS) == sorted(VmConfig.class_trait_names())


def test_every_field_has_help_text():
    helps = VmConfig.field_help()
    assert list(helps) == list(FIELDS)
    for name, text in helps.items():
        assert isinstance(text, str) and len(text) > 20, name


def test_class_docstring_lists_every_field_with_help():
    doc = VmConfig.__doc__
    for name in FIELDS:
        assert f"\n    {name}\n" in doc
    assert "baked defaults" in doc


def test_failed_multi_field_assignment_rolls_back():
    config = VmConfig(vcpus=1)
    with pytest.raises(TraitError, match="VmConfig.memory_mib"), config.hold_trait_notifications():
            config.vcpus = host_cpu_count()
            config.memory_mib = 1
    assert config.vcpus == 1 and config.memory_mib is None
