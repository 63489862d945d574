"""Redis errors named without what they quote: a rotation's arguments are token ciphertexts."""

from __future__ import annotations

import secrets

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from tests.conftest import free_port
from worker.redis_errors import describe


def test_an_error_that_quotes_the_arguments_is_named_by_its_class_alone(
    redis_client: redis.Redis,
) -> None:
    secret = secrets.token_urlsafe(16)
    with pytest.raises(RedisError) as raised:
        redis_client.execute_command("NOSUCHCOMMAND", secret)
    assert secret in str(raised.value)  # Redis quotes it
    assert describe(raised.value) == "ResponseError"


def test_a_mapped_refusal_is_named_by_its_class(redis_client: redis.Redis) -> None:
    with pytest.raises(RedisError) as raised:
        redis_client.execute_command("EVALSHA", "0" * 40, 0)
    assert describe(raised.value) == "NoScriptError"


def test_an_unmapped_code_is_kept_and_the_words_after_it_are_not() -> None:
    error = ResponseError("MISCONF Errors writing to the AOF file: No space left on device")
    assert describe(error) == "ResponseError MISCONF"


def test_the_code_of_an_error_in_a_script_is_kept_whatever_the_redis_version(
    redis_client: redis.Redis,
) -> None:
    redis_client.rpush("a-list", "x")
    with pytest.raises(RedisError) as raised:
        redis_client.eval("return redis.call('GET', KEYS[1])", 1, "a-list")
    assert describe(raised.value) == "ResponseError WRONGTYPE"


def test_an_unreachable_redis_is_named_by_its_class() -> None:
    closed = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    with pytest.raises(RedisError) as raised:
        closed.ping()
    assert describe(raised.value) == "ConnectionError"
