//! A UDP server and client for the end-to-end tests' busybox image (whose
//! `nc` has no UDP). Built by the test harness with `rustc` as a static
//! binary, standard library only.
//!
//! - `udp-tool serve PORT NAME`: answers each datagram on `0.0.0.0:PORT`
//!   with `NAME:` and the datagram, for ever.
//! - `udp-tool ask IP PORT MESSAGE`: sends `MESSAGE` from a socket connected
//!   to `IP:PORT` (so only an answer from there is taken) and prints the
//!   answer, or `NO-ANSWER` after a second.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

fn serve(port: u16, name: &str) -> Result<(), String> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = s.recv_from(&mut buf).map_err(|e| e.to_string())?;
        let mut answer = format!("{name}:").into_bytes();
        answer.extend_from_slice(&buf[..n]);
        let _ = s.send_to(&answer, from);
    }
}

fn ask(to: SocketAddr, message: &str) -> Result<(), String> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
    s.connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    s.send(message.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65_536];
    match s.recv(&mut buf) {
        Ok(n) => println!("{}", String::from_utf8_lossy(&buf[..n])),
        Err(_) => println!("NO-ANSWER"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let done = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", port, name] => port
            .parse()
            .map_err(|e| format!("PORT: {e}"))
            .and_then(|p| serve(p, name)),
        ["ask", ip, port, message] => format!("{ip}:{port}")
            .parse()
            .map_err(|e| format!("IP PORT: {e}"))
            .and_then(|to| ask(to, message)),
        _ => Err("usage: udp-tool serve PORT NAME | ask IP PORT MESSAGE".into()),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp-tool: {e}");
            ExitCode::FAILURE
        }
    }
}
