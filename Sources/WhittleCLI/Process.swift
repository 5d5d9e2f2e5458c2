import CWhittleDNNL

/// Process-wide settings the executables apply at start-up.
public enum ProcessSetup {
    /// Keeps large freed buffers in glibc's heap instead of returning them to the kernel, so the many
    /// activation-sized arrays a training step allocates are reused rather than mapped, faulted in and zeroed again
    /// on every step (that page-fault work was about a sixth of a MobileNetV2 training step).
    public static func tuneAllocator() { wk_tune_allocator() }
}
