"""Channel and server options built from config: message limits and connection ageing."""

from services.common.server import CONNECTION_AGE_GRACE_MS, connection_age_options, message_options


def test_message_limits_are_set_on_both_directions():
    assert dict(message_options(123)) == {"grpc.max_send_message_length": 123,
                                          "grpc.max_receive_message_length": 123}


def test_connection_age_is_off_by_default_and_in_milliseconds_when_set():
    assert connection_age_options(0) == []
    options = dict(connection_age_options(60))
    assert options["grpc.max_connection_age_ms"] == 60_000
    assert options["grpc.max_connection_age_grace_ms"] == CONNECTION_AGE_GRACE_MS >= 10 * 60 * 1000
