#!/usr/bin/env python3
"""A generic gRPC client built from stock parts only: grpcio, grpcio-reflection
and protobuf. It has no generated stubs and no .proto files: every descriptor
comes from the server's reflection service, the way grpcurl works.

    stock_client.py --target 127.0.0.1:7071 list
    stock_client.py --target 127.0.0.1:7071 describe harness.sandbox.v1.SandboxService
    stock_client.py --target 127.0.0.1:7071 call harness.sandbox.v1.SandboxService/ListTools '{}'
    stock_client.py --target unix:/run/harness/sandboxd.sock --authority localhost list

`call` sends one request built from JSON (proto3 JSON mapping) and prints each
response as one line of JSON: one line for a unary rpc, one per message for a
server-streaming rpc.

On a Unix socket grpcio sends the socket path as `:authority`, which the
daemons' HTTP/2 server refuses (the stream is reset with PROTOCOL_ERROR);
`--authority localhost` sets the channel option `grpc.default_authority`.

Exit status: 0 on success, 1 when the rpc fails (the status is printed on
stderr), 2 on a usage error or an unknown symbol.
"""

import argparse
import contextlib
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


class UsageError(Exception):
    """A request this client cannot make (bad symbol, bad JSON, rpc kind)."""


class ReflectionDatabase(ProtoReflectionDescriptorDatabase):
    """grpcio-reflection's database, also for servers that answer an unknown
    symbol or file by ending the stream with NOT_FOUND (tonic-reflection does)
    instead of an in-stream error response: the descriptor pool expects a
    KeyError for "not there"."""

    def FindFileByName(self, name):
        with _not_found_as_key_error(name):
            return super().FindFileByName(name)

    def FindFileContainingSymbol(self, symbol):
        with _not_found_as_key_error(symbol):
            return super().FindFileContainingSymbol(symbol)


@contextlib.contextmanager
def _not_found_as_key_error(key):
    try:
        yield
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            raise KeyError(key) from error
        raise


def channel_for(args):
    options = []
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    return grpc.insecure_channel(args.target, options=options)


def split_method(full_method):
    """`pkg.Service/Method` or `pkg.Service.Method` -> (service, method)."""
    if "/" in full_method:
        service, _, method = full_method.lstrip("/").rpartition("/")
    else:
        service, _, method = full_method.rpartition(".")
    if not service or not method:
        raise UsageError(
            f"{full_method!r} is not a method; expected package.Service/Method"
        )
    return service, method


def find_service(pool, name):
    try:
        return pool.FindServiceByName(name)
    except KeyError as error:
        raise UsageError(f"service {name!r} not found through reflection") from error


def find_method(pool, full_method):
    service_name, method_name = split_method(full_method)
    service = find_service(pool, service_name)
    method = service.methods_by_name.get(method_name)
    if method is None:
        raise UsageError(f"service {service_name} has no method {method_name!r}")
    return method


def rpc_line(method):
    def side(streaming, message):
        return ("stream " if streaming else "") + "." + message.full_name

    return (
        f"rpc {method.name}({side(method.client_streaming, method.input_type)})"
        f" returns ({side(method.server_streaming, method.output_type)});"
    )


LABELS = {
    FieldDescriptor.LABEL_OPTIONAL: "",
    FieldDescriptor.LABEL_REPEATED: "repeated ",
    FieldDescriptor.LABEL_REQUIRED: "required ",
}

SCALAR_TYPES = {
    value: name[len("TYPE_"):].lower()
    for name, value in vars(FieldDescriptor).items()
    if name.startswith("TYPE_")
}


def field_line(field):
    if field.message_type is not None:
        kind = "." + field.message_type.full_name
    elif field.enum_type is not None:
        kind = "." + field.enum_type.full_name
    else:
        kind = SCALAR_TYPES.get(field.type, str(field.type))
    oneof = field.containing_oneof
    where = f"  // oneof {oneof.name}" if oneof is not None else ""
    return f"  {LABELS.get(field.label, '')}{kind} {field.name} = {field.number};{where}"


def describe(pool, symbol):
    """Lines describing a service, a method or a message."""
    try:
        service = pool.FindServiceByName(symbol)
    except KeyError:
        service = None
    if service is not None:
        lines = [f"{service.full_name} is a service:", f"service {service.name} {{"]
        lines += ["  " + rpc_line(method) for method in service.methods]
        return lines + ["}"]
    if "/" in symbol or "." in symbol:
        try:
            method = find_method(pool, symbol)
        except UsageError:
            method = None
        if method is not None:
            return [f"{method.full_name} is a method:", rpc_line(method)]
    try:
        message = pool.FindMessageTypeByName(symbol)
    except KeyError:
        message = None
    if message is not None:
        lines = [f"{message.full_name} is a message:", f"message {message.name} {{"]
        lines += [field_line(field) for field in message.fields]
        return lines + ["}"]
    raise UsageError(f"symbol {symbol!r} not found through reflection")


def call(channel, pool, full_method, request_json, timeout):
    method = find_method(pool, full_method)
    if method.client_streaming:
        raise UsageError(f"{method.full_name} is client-streaming; only unary and "
                         "server-streaming rpcs are supported")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    try:
        request = json_format.Parse(request_json, request_class())
    except json_format.ParseError as error:
        raise UsageError(f"bad request for {method.input_type.full_name}: {error}") from error
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    stub = kind(
        path,
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    responses = stub(request, timeout=timeout)
    if not method.server_streaming:
        responses = [responses]
    for response in responses:
        print(json.dumps(json_format.MessageToDict(response), sort_keys=True), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target",
        required=True,
        help="gRPC target: 127.0.0.1:7071, localhost:7071 or unix:/path/x.sock",
    )
    parser.add_argument(
        "--authority",
        metavar="NAME",
        help="the :authority to send (channel option grpc.default_authority); "
        "use `localhost` on Unix sockets",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="deadline of each rpc, in seconds (default 60)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the services, through reflection")
    describe_parser = commands.add_parser(
        "describe", help="describe a service, method or message"
    )
    describe_parser.add_argument("symbol", metavar="SYMBOL")
    call_parser = commands.add_parser(
        "call", help="call a unary or server-streaming method"
    )
    call_parser.add_argument("method", metavar="FULL_METHOD", help="package.Service/Method")
    call_parser.add_argument(
        "request",
        metavar="JSON",
        nargs="?",
        default="{}",
        help="the request as JSON (default {}); - reads it from stdin",
    )
    args = parser.parse_args(argv)

    with channel_for(args) as channel:
        database = ReflectionDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        try:
            if args.command == "list":
                for service in sorted(database.get_services()):
                    print(service)
            elif args.command == "describe":
                print("\n".join(describe(pool, args.symbol)))
            else:
                request = sys.stdin.read() if args.request == "-" else args.request
                call(channel, pool, args.method, request, args.timeout)
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except grpc.RpcError as error:
            code = error.code()
            name = code.name if code is not None else "UNKNOWN"
            print(f"error: rpc failed: {name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
