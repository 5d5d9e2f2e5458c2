"""Protobuf encoded and decoded by hand (proto/whittle.proto), for requests and answers the binaries never send."""


def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_varint(field, value):
    return _varint(field << 3) + _varint(value)


def pb_bytes(field, data):
    data = data.encode() if isinstance(data, str) else data
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def pb_decode(data):
    """Field number → list of values (ints for varints, bytes for length-delimited)."""
    fields, i = {}, 0

    def varint():
        nonlocal i
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(data):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            length = varint()
            value, i = data[i:i + length], i + length
        elif wire == 5:  # fixed32 (float): the raw little-endian bytes
            value, i = data[i:i + 4], i + 4
        elif wire == 1:  # fixed64 (double)
            value, i = data[i:i + 8], i + 8
        else:
            raise ValueError(f"wire type {wire} not expected")
        fields.setdefault(field, []).append(value)
    return fields
