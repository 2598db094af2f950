"""Pipeline planning: DeServe layer slices, per-host ports, and the ring of next-worker URLs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from remote.slots import Slot, declared_slots
from remote.stages.pipeline import PipelineError, plan_pipeline, split_layers, unit_index
from remote.template import render_argv

WORKER_COMMAND = (
    "python3 -m deserve_worker.worker_api --model=llama-3-70b --num-rounds={num_rounds} "
    "--layer-begin={layer_begin} --layer-end={layer_end} --batch-size=128 --port={port} "
    "--controller-url=http://10.0.0.1:19000 --next-worker-url={next_url}"
)


def unit_sizes(slices: list[tuple[str, str]], num_layers: int) -> list[int]:
    """Units per slice (embedding, each layer and the head count one each), checking the slices chain."""
    sizes = []
    for i, (begin, end) in enumerate(slices):
        if i > 0:
            assert begin == slices[i - 1][1], f"slice {i} does not start where slice {i - 1} ends"
        sizes.append(unit_index(end, num_layers) - unit_index(begin, num_layers))
    return sizes


@pytest.mark.parametrize("workers", [2, 3, 4, 8])
def test_80_layers_split_into_contiguous_complete_balanced_slices(workers: int) -> None:
    slices = split_layers(80, workers)
    assert len(slices) == workers
    assert slices[0][0] == "emb"
    assert slices[-1][1] == "output"
    assert all(b not in ("emb", "output") for b, _ in slices[1:])
    sizes = unit_sizes(slices, 80)
    assert sum(sizes) == 82  # embedding + 80 layers + head, each exactly once
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1


def test_splits_match_the_upstream_examples() -> None:
    # The seed's second worker of two runs --layer-begin=40 --layer-end=output on llama-3-70b.
    assert split_layers(80, 2) == [("emb", "40"), ("40", "output")]
    # upstream deserve_exp/example.toml: eight servers, ten layers each
    assert split_layers(80, 8) == [("emb", "10"), ("10", "20"), ("20", "30"), ("30", "40"),
                                   ("40", "50"), ("50", "60"), ("60", "70"), ("70", "output")]
    assert split_layers(80, 3) == [("emb", "27"), ("27", "54"), ("54", "output")]
    assert split_layers(32, 1) == [("emb", "output")]


def test_as_many_workers_as_units_gives_embedding_and_head_their_own_worker() -> None:
    slices = split_layers(4, 6)
    assert slices == [("emb", "0"), ("0", "1"), ("1", "2"), ("2", "3"), ("3", "4"), ("4", "output")]


def test_weights_give_faster_gpus_proportionally_more_layers() -> None:
    assert split_layers(80, 2, weights=[1, 3]) == [("emb", "20"), ("20", "output")]
    sizes = unit_sizes(split_layers(80, 3, weights=[2.0, 1.0, 1.0]), 80)
    assert sizes == [41, 20, 21] or sizes == [41, 21, 20]
    # a tiny weight still gets a slice of its own
    assert min(unit_sizes(split_layers(10, 3, weights=[1000, 1, 1000]), 10)) == 1


@given(num_layers=st.integers(1, 200), data=st.data())
def test_any_split_covers_every_unit_once_and_is_balanced(num_layers: int, data: st.DataObject) -> None:
    workers = data.draw(st.integers(1, num_layers + 2))
    slices = split_layers(num_layers, workers)
    sizes = unit_sizes(slices, num_layers)
    assert slices[0][0] == "emb" and slices[-1][1] == "output"
    assert sum(sizes) == num_layers + 2 and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_urls_form_a_ring_across_hosts() -> None:
    slots = [Slot("gpu-a", 0), Slot("gpu-b", 0), Slot("gpu-c", 0)]
    addresses = {"gpu-a": "10.0.0.1", "gpu-b": "10.0.0.2", "gpu-c": "10.0.0.3"}
    plan = plan_pipeline(slots, num_layers=80, host_addresses=addresses)
    assert [w.url for w in plan] == ["http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://10.0.0.3:8080"]
    assert [w.next_url for w in plan] == [
        "http://10.0.0.2:8080", "http://10.0.0.3:8080", "http://10.0.0.1:8080"
    ]
    assert [w.rank for w in plan] == [0, 1, 2]
    assert {w.num_rounds for w in plan} == {3}
    assert [(w.layer_begin, w.layer_end) for w in plan] == split_layers(80, 3)


def test_workers_sharing_a_host_get_distinct_ports() -> None:
    slots = [Slot("a", 0), Slot("a", 1), Slot("b", 0), Slot("a", 2)]
    plan = plan_pipeline(slots, num_layers=32, base_port=9000, host_addresses={"a": "a.lan", "b": "b.lan"})
    assert [w.port for w in plan] == [9000, 9001, 9000, 9002]
    assert len({w.url for w in plan}) == 4
    assert plan[-1].next_url == "http://a.lan:9000"
    assert [w.slot.gpu for w in plan] == [0, 1, 0, 2]


def test_fewer_workers_than_slots_use_the_first_slots() -> None:
    plan = plan_pipeline(declared_slots("h", 4), num_layers=80, workers=2, host_addresses={"h": "127.0.0.1"})
    assert [(w.slot.gpu, w.layer_begin, w.layer_end) for w in plan] == [(0, "emb", "40"), (1, "40", "output")]
    assert plan[1].next_url == plan[0].url


def test_ipv6_addresses_are_bracketed_and_scheme_is_kept() -> None:
    plan = plan_pipeline([Slot("h", 0)], num_layers=8, host_addresses={"h": "fd00::1"}, scheme="https")
    assert plan[0].url == "https://[fd00::1]:8080"
    assert plan[0].next_url == plan[0].url  # a one-worker ring points at itself


def test_values_render_the_upstream_worker_command() -> None:
    slots = declared_slots("gpu-a", 2)
    plan = plan_pipeline(slots, num_layers=80, host_addresses={"gpu-a": "10.0.0.5"})
    values = plan[1].values()
    assert values == {"rank": 1, "layer_begin": "40", "layer_end": "output", "port": 8081,
                      "url": "http://10.0.0.5:8081", "next_url": "http://10.0.0.5:8080", "num_rounds": 2,
                      "gpu": 1, "host": "gpu-a"}
    argv = render_argv(WORKER_COMMAND, values)
    assert "--layer-begin=40" in argv and "--layer-end=output" in argv and "--port=8081" in argv
    assert "--next-worker-url=http://10.0.0.5:8080" in argv and "--num-rounds=2" in argv


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"workers": 4}, "4 workers need 4 GPU slots but only 3"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"num_layers": 0}, "num_layers must be at least 1"),
        ({"num_layers": 0, "workers": 3}, "num_layers must be at least 1"),
        ({"host_addresses": {"a": "10.0.0.1"}}, "no address for host b"),
        ({"base_port": 65535}, "out of range"),
        ({"weights": [1.0, 2.0]}, "2 weights given for 3 workers"),
        ({"weights": [1.0, 0.0, 1.0]}, "weights must be positive"),
    ],
)
def test_impossible_pipelines_fail_with_one_line(kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {"num_layers": 80, "host_addresses": {"a": "10.0.0.1", "b": "10.0.0.2"}}
    args.update(kwargs)
    slots = [Slot("a", 0), Slot("b", 0), Slot("a", 1)]
    with pytest.raises(PipelineError) as exc:
        plan_pipeline(slots, **args)  # type: ignore[arg-type]
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_split_rejects_more_workers_than_units() -> None:
    assert len(split_layers(2, 4)) == 4
    with pytest.raises(PipelineError, match="5 workers cannot split 2 layers; at most 4"):
        split_layers(2, 5)
    with pytest.raises(PipelineError, match="4 workers cannot split 1 layers; at most 3"):
        plan_pipeline(declared_slots("h", 4), num_layers=1, host_addresses={"h": "127.0.0.1"})
