"""parse_utkface_name: valid names, the missing-race form, and every reject reason."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agegender.records import labels
from agegender.records.labels import LabelError, Labels, parse_utkface_name, utkface_name


@pytest.mark.parametrize('name, expected', [
    ('25_0_2_20170116174525125.jpg.chip.jpg', Labels(25, 0, 2)),
    ('1_1_4_20161221193016140.jpg', Labels(1, 1, 4)),
    ('UTKFace/100_1_0_20170112213303693.jpg.chip.jpg', Labels(100, 1, 0)),
    ('crop_part1/0_0_3_20161219140623097.jpg.chip.jpg', Labels(0, 0, 3)),
    ('a\\b\\120_0_1_20170117195405372.jpg.chip.jpg', Labels(120, 0, 1)),
    # Real UTKFace files without the race field.
    ('39_1_20170116174525125.jpg.chip.jpg', Labels(39, 1, -1)),
    ('61_1_20170109150557335.jpg.chip.jpg', Labels(61, 1, -1)),
    ('61_3_20170109150557335.JPG', None),
    # Real UTKFace files whose ending is mangled: the labels are the first three fields.
    ('24_0_1_20170116220224657 .jpg.chip.jpg', Labels(24, 0, 1)),
    ('55_0_0_20170116232725357jpg.chip.jpg', Labels(55, 0, 0)),
    ('UTKFace/1_0_2_201612201912323831.jpg.chip.jpg', Labels(1, 0, 2)),  # 18 digits.
])
def test_parses_real_names(name, expected):
  if expected is None:
    with pytest.raises(LabelError, match='gender'):
      parse_utkface_name(name)
  else:
    assert parse_utkface_name(name) == expected


@pytest.mark.parametrize('name, reason', [
    ('25_0_2_20170116174525125.png', 'not a .jpg'),
    ('notes.txt', 'not a .jpg'),
    ('25_0_2_20170116174525125.jpg.chip', 'not a .jpg'),
    ('25_0_2_3_20170116174525125.jpg', 'fields'),
    ('25_20170116174525125.jpg', 'fields'),
    ('.jpg', 'fields'),
    ('25_0_2_.jpg', 'datetime'),
    ('25_0_2_2017x116.jpg', 'datetime'),
    ('25_0_2.jpg', 'datetime'),  # Too short for a datetime: not the race-less form.
    ('25_0_2_ 20170116220224657.jpg', 'datetime'),
    ('25 _0_2_20170116220224657.jpg', 'age is not an integer'),
    ('x_0_2_20170116174525125.jpg', 'age is not an integer'),
    ('2.5_0_2_20170116174525125.jpg', 'age is not an integer'),
    ('_0_2_20170116174525125.jpg', 'age is not an integer'),
    ('121_0_2_20170116174525125.jpg', 'age out of range'),
    ('-1_0_2_20170116174525125.jpg', 'age out of range'),
    ('25_2_2_20170116174525125.jpg', 'gender not 0 or 1'),
    ('25_-1_2_20170116174525125.jpg', 'gender not 0 or 1'),
    ('25_m_2_20170116174525125.jpg', 'gender is not an integer'),
    ('25_0_5_20170116174525125.jpg', 'race out of range'),
    ('25_0_-2_20170116174525125.jpg', 'race out of range'),
    ('25_0_w_20170116174525125.jpg', 'race is not an integer'),
])
def test_rejects_with_reason(name, reason):
  with pytest.raises(LabelError, match=reason):
    parse_utkface_name(name)


valid_labels = st.builds(
    Labels,
    age=st.integers(0, labels.MAX_AGE),
    gender=st.integers(0, 1),
    race=st.integers(labels.UNKNOWN_RACE, len(labels.RACES) - 1))
datetimes = st.text('0123456789', min_size=8, max_size=20)


@given(valid_labels, datetimes, st.sampled_from(['', 'UTKFace/', 'a/b/']))
def test_round_trip(expected, datetime, folder):
  assert parse_utkface_name(folder + utkface_name(expected, datetime)) == expected


@given(st.integers(), st.integers(), st.integers(-3, 8), datetimes)
def test_accepts_exactly_the_valid_ranges(age, gender, race, datetime):
  name = f'{age}_{gender}_{race}_{datetime}.jpg'
  valid = 0 <= age <= 120 and gender in (0, 1) and -1 <= race <= 4
  if valid:
    assert parse_utkface_name(name) == Labels(age, gender, race)
  else:
    with pytest.raises(LabelError):
      parse_utkface_name(name)


@given(st.text())
def test_any_text_parses_or_raises_label_error(name):
  try:
    result = parse_utkface_name(name)
  except LabelError as e:
    assert str(e)
  else:
    assert 0 <= result.age <= 120 and result.gender in (0, 1)
