import numpy as np
import pytest

from pipeline import schema as S


def test_text_columns_that_arrive_as_float_nans_get_their_none_back():
    batch = {S.ERROR: np.full(3, np.nan, dtype=np.float32), S.CAPTION: np.array(["a", None, "c"], dtype=object),
             S.AESTHETIC_SCORE: np.full(3, np.nan, dtype=np.float32)}
    restored = S.restore_null_text(batch)
    assert restored[S.ERROR].dtype == object and list(restored[S.ERROR]) == [None, None, None]
    assert list(restored[S.CAPTION]) == ["a", None, "c"]
    assert np.isnan(restored[S.AESTHETIC_SCORE]).all()  # a float column stays a float column


def test_a_text_column_holding_numbers_is_an_error_not_a_silent_cast():
    with pytest.raises(TypeError, match="caption"):
        S.restore_null_text({S.CAPTION: np.array([1.0, np.nan])})
