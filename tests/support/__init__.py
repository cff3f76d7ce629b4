"""Helpers the tests share; none of them is a test module (nothing here is named ``test_*``).

Processes the suite starts:
    :mod:`~tests.support.redis_server`, :mod:`~tests.support.redis_cluster` (Redis),
    :mod:`~tests.support.gateway_process` (``hangon serve`` or the demo agent),
    :mod:`~tests.support.balancer` (HAProxy and nginx), :mod:`~tests.support.tools`
    (programs installed with apt where missing).
Peers of a gateway:
    :mod:`~tests.support.wsclient` (protocol v1 over websockets), :mod:`~tests.support.relayclient`
    (a caller that checks exactly-once delivery), :mod:`~tests.support.agents` (voice agents),
    :mod:`~tests.support.peers` (hostile peers and their bystander),
    :mod:`~tests.support.streamer` (a steady caller on :class:`gateway.client.Client`),
    :mod:`~tests.support.httpget` (a bare HTTP GET).
In-process gateways:
    :mod:`~tests.support.gateways` (what the ``make_gateway`` and ``relay`` fixtures build),
    :mod:`~tests.support.clock` (a clock the test sets), :mod:`~tests.support.gwmetrics`
    (reading a gateway's metrics), :mod:`~tests.support.poll` (waiting for a condition).
Stores and what they hold:
    :mod:`~tests.support.stores` (the store kinds, and the keys every store seals with),
    :mod:`~tests.support.storewrap` (wrappers that change one behaviour of a real store),
    :mod:`~tests.support.records` (sessions and writes for the store tests).
Fuzzing:
    :mod:`~tests.support.fuzzframes` (hypothesis strategies), :mod:`~tests.support.fuzzagent`
    (the agent that answers with them).
Tokens:
    :mod:`~tests.support.authkeys`.
"""
