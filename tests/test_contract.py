"""contract: the hand-encoded records are TensorFlow's own bytes."""

import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from agegender import contract
from agegender.records import labels


def _tensorflow_example(image, age, gender, race, file_name):
  bytes_feature = lambda value: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
  int64_feature = lambda value: tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
  example = tf.train.Example(features=tf.train.Features(feature={
      contract.IMAGE: bytes_feature(image),
      contract.FILE_NAME: bytes_feature(file_name.encode('utf-8')),
      contract.AGE: int64_feature(age),
      contract.GENDER: int64_feature(gender),
      contract.RACE: int64_feature(race),
  }))
  return example.SerializeToString(deterministic=True)


records = st.tuples(
    st.binary(max_size=3000),
    st.integers(0, labels.MAX_AGE),
    st.integers(0, len(labels.GENDERS) - 1),
    st.integers(labels.UNKNOWN_RACE, len(labels.RACES) - 1),
    st.text(max_size=60))


@settings(max_examples=300, deadline=None)
@given(records)
def test_serialize_example_is_tensorflows_deterministic_serialization(record):
  assert contract.serialize_example(*record) == _tensorflow_example(*record)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**21), st.integers(-2**63, 2**63 - 1),
       st.integers(-2**63, 2**63 - 1), st.integers(-2**63, 2**63 - 1))
def test_any_length_and_int64_is_encoded_as_tensorflow_does(length, age, gender, race):
  record = (b'\xab' * length, age, gender, race, 'x.jpg')
  assert contract.serialize_example(*record) == _tensorflow_example(*record)


def test_the_pipeline_parses_it_back():
  image, name = bytes(range(256)) * 70, '39_1_20170116174525125.jpg.chip.jpg ünïcode/名前'
  parsed = tf.io.parse_single_example(
      contract.serialize_example(image, 39, 1, -1, name), contract.feature_spec())
  assert {key: value.numpy() for key, value in parsed.items()} == {
      contract.IMAGE: image, contract.AGE: 39, contract.GENDER: 1, contract.RACE: -1,
      contract.FILE_NAME: name.encode('utf-8')}


def test_a_value_outside_int64_is_refused():
  with pytest.raises(ValueError, match='int64'):
    contract.serialize_example(b'', 2**63, 0, 0, 'x.jpg')
