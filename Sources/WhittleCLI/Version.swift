/// Whittle's version, reported by `--version` and, later, in worker capabilities.
public enum WhittleVersion {
    public static let string = "0.1.0"
}
