fn main() -> std::process::ExitCode {
    // One rustls crypto provider for the whole process, before anything uses TLS.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    mailbridge::cli::main()
}
