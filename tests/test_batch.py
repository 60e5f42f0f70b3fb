import pytest

from subpixal_jax.core.batch import CUTOUT_BUCKETS, cutout_bucket, source_bucket


@pytest.mark.parametrize(("size", "expected"), [(1, 16), (16, 16), (17, 24), (41, 48)])
def test_cutout_bucket(size, expected):
    assert cutout_bucket(size) == expected


def test_cutout_buckets_are_fft_friendly():
    for bucket in CUTOUT_BUCKETS:
        n = bucket
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        assert n == 1, bucket


def test_cutout_bucket_rejects_bad_sizes():
    with pytest.raises(ValueError, match="size"):
        cutout_bucket(0)
    with pytest.raises(ValueError, match="exceeds"):
        cutout_bucket(10_000)


@pytest.mark.parametrize(
    ("count", "expected"), [(0, 32), (32, 32), (33, 64), (1000, 1024)]
)
def test_source_bucket(count, expected):
    assert source_bucket(count) == expected


def test_source_bucket_rejects_negative():
    with pytest.raises(ValueError, match="count"):
        source_bucket(-1)


def test_source_chunk_bounds_padded_pixels():
    from subpixal_jax.core.batch import (
        CHUNK_SIDE,
        MAX_SOURCE_CHUNK,
        MIN_SOURCE_CHUNK,
        source_chunk,
    )

    for platform, top in MAX_SOURCE_CHUNK.items():
        sizes = [source_chunk(side, platform) for side in CUTOUT_BUCKETS]
        assert sizes == sorted(sizes, reverse=True)
        for side, n in zip(CUTOUT_BUCKETS, sizes, strict=True):
            assert MIN_SOURCE_CHUNK <= n <= top
            assert n & (n - 1) == 0  # a power of two: shards over 2^k devices
            if n > MIN_SOURCE_CHUNK:
                assert n * side**2 <= top * CHUNK_SIDE**2
    with pytest.raises(ValueError, match="side"):
        source_chunk(0)
