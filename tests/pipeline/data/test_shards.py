import pytest
from tarfixtures import good_sample, tar_bytes

from pipeline.data.shards import expand_braces, expand_shards
from pipeline.data.storage import write_bytes_atomic

TAR = tar_bytes(good_sample("k"))


def test_expand_braces_ranges_lists_and_padding():
    assert expand_braces("s-{000..003}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
    assert expand_braces("s-{8..11}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{train,val}-{0..1}.tar") == ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]
    assert len(expand_braces("s3://b/train-{000000..000127}.tar")) == 128
    assert expand_braces("s3://b/train-{000000..000127}.tar")[-1] == "s3://b/train-000127.tar"
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="runs backwards"):
        expand_braces("s-{5..1}.tar")
    with pytest.raises(ValueError, match="must hold a range"):
        expand_braces("s-{abc}.tar")


@pytest.fixture
def shard_dir(tmp_path):
    root = tmp_path / "wds"
    (root / "sub").mkdir(parents=True)
    for name in ["train-000001.tar", "train-000000.tar", "val-000000.tar", "sub/extra-000000.tar"]:
        (root / name).write_bytes(TAR)
    (root / "notes.txt").write_text("not a shard")
    return root


def test_prefix_lists_all_tars_below_sorted(shard_dir):
    urls = expand_shards(f"{shard_dir}/")
    names = [u[len(str(shard_dir)) + 1 :] for u in urls]
    assert names == ["sub/extra-000000.tar", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert expand_shards(str(shard_dir)) == urls  # a directory without '/' works the same


def test_brace_pattern_local_and_file_url(shard_dir):
    assert expand_shards(f"{shard_dir}/train-{{000000..000001}}.tar") == [
        f"{shard_dir}/train-000000.tar", f"{shard_dir}/train-000001.tar"
    ]
    assert expand_shards(f"file://{shard_dir}/train-{{000000..000001}}.tar") == [
        f"file://{shard_dir}/train-000000.tar", f"file://{shard_dir}/train-000001.tar"
    ]
    assert expand_shards(f"file://{shard_dir}/") [0] == f"file://{shard_dir}/sub/extra-000000.tar"


def test_partly_missing_brace_range_is_an_error(shard_dir):
    with pytest.raises(ValueError, match="1 of 3 shards do not exist.*train-000002.tar"):
        expand_shards(f"{shard_dir}/train-{{000000..000002}}.tar")


def test_single_path_glob_and_list_file(shard_dir, tmp_path):
    assert expand_shards(str(shard_dir / "val-000000.tar")) == [str(shard_dir / "val-000000.tar")]
    assert expand_shards(f"{shard_dir}/train-*.tar") == [
        f"{shard_dir}/train-000000.tar", f"{shard_dir}/train-000001.tar"
    ]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# shards\n{shard_dir}/val-000000.tar\n\n{shard_dir}/train-{{000000..000001}}.tar\n")
    assert expand_shards(f"@{listing}") == [
        f"{shard_dir}/val-000000.tar", f"{shard_dir}/train-000000.tar", f"{shard_dir}/train-000001.tar"
    ]


@pytest.mark.parametrize(
    "spec_suffix", ["nothing-{000..003}.tar", "empty/", "missing.tar", "zzz-*.tar"]
)
def test_nothing_matches_names_the_spec(shard_dir, spec_suffix):
    (shard_dir / "empty").mkdir()
    spec = f"{shard_dir}/{spec_suffix}"
    with pytest.raises(ValueError, match="matches no shard") as err:
        expand_shards(spec)
    assert spec in str(err.value)


def test_missing_list_file(tmp_path):
    with pytest.raises(ValueError, match="list file .* does not exist"):
        expand_shards(f"@{tmp_path}/nolist.txt")
    with pytest.raises(ValueError, match="empty shard spec"):
        expand_shards("  ")


def test_memory_urls():
    for name in ["b-000001.tar", "b-000000.tar", "deep/c-000000.tar"]:
        write_bytes_atomic(f"memory://shards-test/{name}", TAR)
    assert expand_shards("memory://shards-test/") == [
        "memory://shards-test/b-000000.tar", "memory://shards-test/b-000001.tar",
        "memory://shards-test/deep/c-000000.tar",
    ]
    assert expand_shards("memory://shards-test/b-{000000..000001}.tar") == [
        "memory://shards-test/b-000000.tar", "memory://shards-test/b-000001.tar"
    ]


def test_s3_prefix_and_braces(s3_env):
    base = f"s3://{s3_env.bucket}/test_shards"
    for name in ["train-000002.tar", "train-000000.tar", "train-000001.tar", "x/y-000000.tar"]:
        write_bytes_atomic(f"{base}/{name}", TAR)
    write_bytes_atomic(f"{base}/readme.txt", b"hi")
    assert expand_shards(f"{base}/") == [
        f"{base}/train-000000.tar", f"{base}/train-000001.tar", f"{base}/train-000002.tar",
        f"{base}/x/y-000000.tar",
    ]
    assert expand_shards(f"{base}/train-{{000001..000002}}.tar") == [
        f"{base}/train-000001.tar", f"{base}/train-000002.tar"
    ]
    # A shard written after a first listing is seen by the next (incremental runs).
    write_bytes_atomic(f"{base}/train-000003.tar", TAR)
    assert f"{base}/train-000003.tar" in expand_shards(f"{base}/")
    with pytest.raises(ValueError, match="matches no shard"):
        expand_shards(f"s3://{s3_env.bucket}/no-such-prefix/")


def test_prefix_reads_compressed_tars_and_names_every_other_file(shard_dir):
    """Issue 14: a .tar.gz below a prefix is read, and the files that are not shards are named."""
    import gzip

    from pipeline.data.reader import read_samples
    from pipeline.data.shards import find_shard_files

    (shard_dir / "zipped-000000.tar.gz").write_bytes(gzip.compress(TAR))
    (shard_dir / "zipped-000001.TGZ").write_bytes(gzip.compress(TAR))
    listing = find_shard_files(f"{shard_dir}/")
    names = [u[len(str(shard_dir)) + 1 :] for u in listing.urls]
    assert names == [
        "sub/extra-000000.tar", "train-000000.tar", "train-000001.tar", "val-000000.tar",
        "zipped-000000.tar.gz", "zipped-000001.TGZ",
    ]
    assert listing.skipped == [f"{shard_dir}/notes.txt"]
    assert expand_shards(f"{shard_dir}/") == listing.urls
    assert [s.ok for s in read_samples(listing.urls[4])] == [True]


def test_localize_says_the_files_it_skips(shard_dir):
    from pipeline.localize.run import find_shards

    said = []
    listing = find_shards(f"{shard_dir}/", None, said.append)
    assert len(listing.urls) == 4 and listing.skipped == [f"{shard_dir}/notes.txt"]
    assert said == [f"skipped 1 file(s) in '{shard_dir}/' that are not shards (*.tar, *.tar.gz, *.tgz): "
                    f"{shard_dir}/notes.txt"]
