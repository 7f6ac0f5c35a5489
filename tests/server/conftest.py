import openai
import pytest

from moeserve.server.app import ServerConfig
from tests.server.harness import KEY, MODEL, start_server, stop_server


@pytest.fixture(scope="package")
def server():
    running = start_server(ServerConfig(model_name=MODEL, api_key=KEY, max_request_bytes=2**20), max_num_seqs=128)
    yield running
    stop_server(running)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
