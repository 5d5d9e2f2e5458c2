/// Element types, numbered as ONNX's `TensorProto.DataType` so that conversions are a plain raw-value lookup.
public enum DataType: Int32, Sendable, CaseIterable, CustomStringConvertible {
    case undefined = 0
    case float = 1
    case uint8 = 2
    case int8 = 3
    case uint16 = 4
    case int16 = 5
    case int32 = 6
    case int64 = 7
    case string = 8
    case bool = 9
    case float16 = 10
    case double = 11
    case uint32 = 12
    case uint64 = 13
    case complex64 = 14
    case complex128 = 15
    case bfloat16 = 16
    case float8e4m3fn = 17
    case float8e4m3fnuz = 18
    case float8e5m2 = 19
    case float8e5m2fnuz = 20
    case uint4 = 21
    case int4 = 22

    /// True for the types a `Tensor` holds in `floats` (converted to Float32 in memory).
    public var isFloatingPoint: Bool {
        switch self {
        case .float, .float16, .double, .bfloat16: true
        default: false
        }
    }

    /// True for the types a `Tensor` holds in `ints` (widened to Int64 in memory).
    public var isInteger: Bool {
        switch self {
        case .uint8, .int8, .uint16, .int16, .int32, .int64, .bool, .uint32, .uint64, .uint4, .int4: true
        default: false
        }
    }

    /// The inclusive range of an integer type, used by quantization and by value checks on load.
    public var integerRange: ClosedRange<Int64>? {
        switch self {
        case .uint8: 0...255
        case .int8: -128...127
        case .uint16: 0...65535
        case .int16: -32768...32767
        case .int32: Int64(Int32.min)...Int64(Int32.max)
        case .int64, .uint64: Int64.min...Int64.max
        case .uint32: 0...Int64(UInt32.max)
        case .bool: 0...1
        case .uint4: 0...15
        case .int4: -8...7
        default: nil
        }
    }

    public var description: String {
        switch self {
        case .undefined: "undefined"
        case .float: "float32"
        case .uint8: "uint8"
        case .int8: "int8"
        case .uint16: "uint16"
        case .int16: "int16"
        case .int32: "int32"
        case .int64: "int64"
        case .string: "string"
        case .bool: "bool"
        case .float16: "float16"
        case .double: "float64"
        case .uint32: "uint32"
        case .uint64: "uint64"
        case .complex64: "complex64"
        case .complex128: "complex128"
        case .bfloat16: "bfloat16"
        case .float8e4m3fn: "float8e4m3fn"
        case .float8e4m3fnuz: "float8e4m3fnuz"
        case .float8e5m2: "float8e5m2"
        case .float8e5m2fnuz: "float8e5m2fnuz"
        case .uint4: "uint4"
        case .int4: "int4"
        }
    }
}
