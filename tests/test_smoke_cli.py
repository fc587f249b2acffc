from tests.conftest import TINY


def test_train_tiny_writes_summary(effrun):
    r = effrun("train", *TINY)
    s = r.summary()
    assert s["status"] == "completed"
    assert s["measured/params_trainable"] == s["measured/params_total"] > 0
    assert s["measured/tokens_per_s"] > 0
    rows = r.metrics()
    assert [row["step"] for row in rows] == [0, 1, 2]
