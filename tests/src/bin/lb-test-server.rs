//! Small test servers for backends: see `lb_tests::servers`.

use std::process::ExitCode;

fn main() -> ExitCode {
    match lb_tests::servers::server_main(std::env::args().skip(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-test-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}
