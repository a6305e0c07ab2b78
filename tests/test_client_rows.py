"""The client keeps a multi-row answer whose last rows were not reached (issue 15's per-row
status): their numbers are NaN, their status says why, the rows explained are intact."""

from __future__ import annotations

import numpy as np

from service.api.tensors import from_array
from service.client.explanation import from_response
from sidelight.v1 import explainer_pb2 as pb


def response(labels: bool) -> pb.ExplainResponse:
    done = pb.RowExplanation(attributions=[1.0, 2.0], std_errors=[0.1, 0.2], ci_low=[0.8, 1.6],
                             ci_high=[1.2, 2.4], base_values=[0.5], predictions=[3.5],
                             status="OK", maps=[from_array("x", np.ones((1, 2)))])
    if labels:
        done.labels.extend(["good @0", "film @1"])
    missed = pb.RowExplanation(status="NOT_REACHED", status_detail="the budget ran out")
    return pb.ExplainResponse(model="m", output_names=["y"], rows=[done, missed],
                              feature_names=[] if labels else ["a", "b"])


def test_rows_not_reached_come_back_as_nan_with_their_status() -> None:
    for labels in (False, True):
        e = from_response(response(labels))
        assert e.values.shape == (2, 1, 2) and e.maps["x"].shape == (2, 1, 2)
        np.testing.assert_array_equal(e.values[0, 0], [1.0, 2.0])
        assert np.isnan(e.values[1]).all() and np.isnan(e.maps["x"][1]).all()
        assert np.isnan(e.predictions[1]).all() and e.predictions[0, 0] == 3.5
        assert [r.status for r in e.rows] == ["OK", "NOT_REACHED"]
        assert e.rows[1].status_detail == "the budget ran out"
