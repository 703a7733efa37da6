#!/usr/bin/env python3
"""A mock of the Anthropic Messages API, for running the real Claude Code offline.

POST /v1/messages answers with a streamed (SSE) reply. While the conversation has
no tool_result yet and the request offers the tool named in argv[1], it asks for
one call of that tool with the JSON input in argv[2]; once the tool_result is
back, it answers with text that quotes the result, and `end_turn`. When argv[2]
is a JSON list, it asks for one call per element, in turn (the next once the
previous tool_result is back), then ends the turn. Requests that
offer no such tool (title generation and the like) get a short text reply.

Prints the port it listens on (127.0.0.1, an ephemeral port) as the first line
of stdout, then serves until killed. Every request body is appended as one JSON
line to the file in argv[3], so a test can see what Claude Code sent.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOOL = sys.argv[1]
TOOL_INPUT = json.loads(sys.argv[2])
LOG = sys.argv[3]


def sse(event, data):
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def tool_results(body):
    out = []
    for msg in body.get("messages", []):
        content = msg.get("content")
        if msg.get("role") == "user" and isinstance(content, list):
            out += [c for c in content if c.get("type") == "tool_result"]
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        self.do_HEAD()

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        with open(LOG, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body}) + "\n")
        if not self.path.startswith("/v1/messages") or self.path.startswith("/v1/messages/count_tokens"):
            reply = json.dumps({"input_tokens": 10}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
            return
        offered = [t.get("name") for t in body.get("tools", []) or []]
        results = tool_results(body)
        model = body.get("model", "claude-mock")
        events = [sse("message_start", {"type": "message_start", "message": {
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1}}})]
        inputs = TOOL_INPUT if isinstance(TOOL_INPUT, list) else [TOOL_INPUT]
        if TOOL in offered and len(results) < len(inputs):
            tool_input = inputs[len(results)]
            events += [
                sse("content_block_start", {"type": "content_block_start", "index": 0,
                    "content_block": {"type": "tool_use", "id": f"toolu_mock{len(results) + 1}", "name": TOOL, "input": {}}}),
                sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": json.dumps(tool_input)}}),
                sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
                sse("message_delta", {"type": "message_delta",
                    "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 5}}),
            ]
        else:
            text = "mock reply"
            if results:
                text = "tool said: " + json.dumps(results[-1].get("content"))[:500]
            events += [
                sse("content_block_start", {"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
                sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": text}}),
                sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
                sse("message_delta", {"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 5}}),
            ]
        events.append(sse("message_stop", {"type": "message_stop"}))
        payload = b"".join(events)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
