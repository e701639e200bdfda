"""llada-agent: an async SDK for LLaDA2.0-Uni — sessions with cached multimodal history, typed replies and
events, think-then-draw hooks.

```python
import llada_agent

async with llada_agent.load("tiny") as model:
    chat = model.session(mode="chat")
    reply = await chat.ask("What is in this picture?", image="photo.png")
    print(reply.text)
```
"""

from .client import ClientSession, RemoteTurnStream
from .errors import (
    Busy,
    Cancelled,
    ContextLengthError,
    GenerationFailed,
    ImageError,
    InvalidInputError,
    LLaDAError,
    MalformedOutputError,
    ModelClosed,
    ModelLoadError,
    SessionFileError,
    SessionNotFound,
    Timeout,
)
from .hooks import Accept, Approve, Draw, Drawing, DrawPlan, Hooks, PlanReview, Redraw, Revise, Skip
from .model import Model, load
from .remote import RemoteModel, RemoteSession
from .schemas import (
    EVENT_ADAPTER,
    CacheInfo,
    EditOptions,
    ErrorEvent,
    Event,
    ImageDecoded,
    ImageDecodeProgress,
    ImageOptions,
    ImagePart,
    ImageProgress,
    ImageStarted,
    ImageTokensDone,
    Message,
    Part,
    Reply,
    StoryOptions,
    TextBlock,
    TextOptions,
    TextPart,
    ThinkingBlock,
    ThinkingPart,
    ThinkOptions,
    TurnDone,
    Usage,
)
from .session import Conversation, Session, TurnStream
from .stateless import StatelessSession

__all__ = [
    "EVENT_ADAPTER", "Accept", "Approve", "Busy", "CacheInfo", "Cancelled", "ClientSession",
    "ContextLengthError", "Conversation", "Draw", "DrawPlan", "Drawing", "EditOptions", "ErrorEvent",
    "Event", "GenerationFailed", "Hooks", "ImageDecodeProgress", "ImageDecoded", "ImageError",
    "ImageOptions", "ImagePart", "ImageProgress", "ImageStarted", "ImageTokensDone", "InvalidInputError",
    "LLaDAError", "MalformedOutputError", "Message", "Model", "ModelClosed", "ModelLoadError", "Part",
    "PlanReview", "Redraw", "RemoteModel", "RemoteSession", "RemoteTurnStream", "Reply", "Revise",
    "Session", "SessionFileError", "SessionNotFound", "Skip", "StatelessSession", "StoryOptions",
    "TextBlock", "TextOptions", "TextPart", "ThinkOptions", "ThinkingBlock", "ThinkingPart", "Timeout",
    "TurnDone", "TurnStream", "Usage", "load",
]
