import itertools
import os

import pytest

from pharmafl.secure_sum.shamir import Share, interpolate_at_zero, reconstruct_secret, split_secret


def test_any_t_of_n_reconstruct_and_t_minus_1_fail():
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=3, holders=5)
    for subset in itertools.combinations(shares, 3):
        assert reconstruct_secret(list(subset), 3) == secret
    for subset in itertools.combinations(shares, 2):
        with pytest.raises(ValueError, match="need 3 shares"):
            reconstruct_secret(list(subset), 3)
        # interpolating t-1 points gives a value unrelated to the secret
        assert interpolate_at_zero(list(subset)) != int.from_bytes(secret, "big")


def test_shares_serialise_and_threshold_edges():
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=1, holders=1)
    assert reconstruct_secret([Share.from_bytes(shares[0].to_bytes())], 1) == secret
    shares = split_secret(secret, threshold=4, holders=4)
    assert reconstruct_secret(shares[::-1], 4) == secret
    with pytest.raises(ValueError):
        split_secret(secret, threshold=5, holders=4)


def test_duplicate_shares_do_not_count_twice():
    shares = split_secret(os.urandom(32), threshold=3, holders=5)
    with pytest.raises(ValueError, match="need 3"):
        reconstruct_secret([shares[0], shares[0], shares[1]], 3)


def test_altered_share_gives_a_wrong_or_refused_secret():
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=3, holders=5)
    bad = [Share(shares[0].x, shares[0].y + 1)] + shares[1:3]
    try:
        assert reconstruct_secret(bad, 3) != secret
    except ValueError as err:
        assert "inconsistent" in str(err)
