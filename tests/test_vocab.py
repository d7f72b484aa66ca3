"""Host-side vocabularies: encode_labels, decode_predictions, class_names."""

import numpy as np
import pytest

import jheads
from jheads import metrics


def test_binary_string_labels_round_trip():
  head = jheads.binary_classification_head(name="sex", label_vocabulary=["female", "male"])
  ids = jheads.encode_labels(head, np.array([["male"], ["female"], ["male"]]))
  np.testing.assert_array_equal(ids, [[1], [0], [1]])
  assert ids.dtype == np.int32
  logits = np.array([[2.0], [-1.0], [-3.0]], np.float32)
  values = metrics.compute(head.metric_fn(logits, ids))
  assert float(values["accuracy/sex"]) == pytest.approx(2 / 3)
  decoded = jheads.decode_predictions(head, head.predict_fn(logits))
  np.testing.assert_array_equal(decoded["classes"], [["male"], ["female"], ["female"]])
  np.testing.assert_array_equal(decoded["all_classes"], [["female", "male"]] * 3)
  np.testing.assert_array_equal(decoded["class_ids"], [[1], [0], [0]])


def test_bytes_labels_are_decoded():
  head = jheads.multi_class_head(3, label_vocabulary=["a", "b", "c"])
  np.testing.assert_array_equal(jheads.encode_labels(head, np.array([b"c", b"a"])), [2, 0])


def test_unknown_labels_raise_with_their_names():
  head = jheads.multi_class_head(3, name="species", label_vocabulary=["Adelie", "Chinstrap", "Gentoo"])
  with pytest.raises(ValueError, match=r"head 'species': labels 'Emperor' are not in label_vocabulary"):
    jheads.encode_labels(head, np.array(["Adelie", "Emperor"]))


def test_string_labels_without_vocabulary_raise():
  with pytest.raises(ValueError, match=r"binary_classification_head: labels are strings but the head has no label_vocabulary"):
    jheads.encode_labels(jheads.binary_classification_head(), np.array(["yes", "no"]))


def test_numeric_labels_pass_through():
  head = jheads.regression_head()
  labels = np.array([1.5, 2.5], np.float32)
  np.testing.assert_array_equal(jheads.encode_labels(head, labels), labels)


def test_multi_label_lists_of_names_become_an_indicator():
  head = jheads.multi_label_head(3, name="tags", label_vocabulary=["red", "green", "blue"])
  indicator = jheads.encode_labels(head, [["red", "blue"], [], ["green"]])
  np.testing.assert_array_equal(indicator, [[1, 0, 1], [0, 0, 0], [0, 1, 0]])
  decoded = jheads.decode_predictions(head, head.predict_fn(np.zeros((3, 3), np.float32)))
  np.testing.assert_array_equal(decoded["classes"], [["red", "green", "blue"]] * 3)
  with pytest.raises(ValueError, match=r"labels 'purple' are not in label_vocabulary"):
    jheads.encode_labels(head, [["purple"]])
  # A batch in which no example has any label is still a batch.
  empty = jheads.encode_labels(head, [[], []])
  np.testing.assert_array_equal(empty, np.zeros((2, 3)))
  np.testing.assert_allclose(head.loss_fn(np.zeros((2, 3), np.float32), empty), np.log(2.0), rtol=1e-6)


def test_multi_label_numeric_labels_are_an_indicator_and_ragged_ids_are_rejected():
  head = jheads.multi_label_head(3, name="tags")
  np.testing.assert_array_equal(jheads.encode_labels(head, [[0, 1, 1], [1, 0, 0]]), [[0, 1, 1], [1, 0, 0]])
  with pytest.raises(ValueError, match=r"head 'tags': multi-label labels must be a 0/1 indicator .* lists of unequal length"):
    jheads.encode_labels(head, [[0], [1, 2]])


def test_multi_head_encodes_and_decodes_per_head():
  head = jheads.multi_head(
      [
          jheads.multi_class_head(3, name="species", label_vocabulary=["x", "y", "z"]),
          jheads.regression_head(name="mass"),
      ]
  )
  encoded = jheads.encode_labels(head, {"species": np.array(["z", "x"]), "mass": np.array([1.0, 2.0])})
  np.testing.assert_array_equal(encoded["species"], [2, 0])
  np.testing.assert_array_equal(encoded["mass"], [1.0, 2.0])
  with pytest.raises(ValueError, match=r"multi_head: labels for unknown head\(s\) \['size'\]"):
    jheads.encode_labels(head, {"size": np.array([1.0])})
  predictions = head.predict_fn(np.array([[0.0, 0.0, 5.0, 1.0]], np.float32))
  decoded = jheads.decode_predictions(head, predictions)
  np.testing.assert_array_equal(decoded[("species", "classes")], [["z"]])
  assert ("mass", "classes") not in decoded
  assert isinstance(decoded[("mass", "predictions")], np.ndarray)


def test_rank3_classes_cover_every_batch_axis():
  head = jheads.multi_class_head(3)
  decoded = jheads.decode_predictions(head, head.predict_fn(np.zeros((2, 4, 3), np.float32)))
  assert decoded["classes"].shape == (2, 4, 1)
  assert decoded["all_classes"].shape == (2, 4, 3)
  np.testing.assert_array_equal(decoded["all_classes"][1, 3], ["0", "1", "2"])


def test_class_names():
  assert jheads.class_names(jheads.multi_class_head(3)) == ("0", "1", "2")
  assert jheads.class_names(jheads.binary_classification_head(label_vocabulary=("n", "y"))) == ("n", "y")
  assert jheads.class_names(jheads.regression_head()) is None
