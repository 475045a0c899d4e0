from chat_upstream import *  # noqa: F403
from db_fixtures import *  # noqa: F403
from relay_fixtures import *  # noqa: F403
