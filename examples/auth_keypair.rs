//! Writes a fresh Ed25519 key pair as PEM: `cargo run --example auth_keypair -- PRIVATE PUBLIC`.
//! The private key signs tokens (`collab-engine token --key-file PRIVATE`), the public one goes
//! to the server (`--auth-key-file PUBLIC`). For benchmarks and local tries; production keys
//! come from the token issuer (`openssl genpkey -algorithm ed25519`).

use std::io::Read;

use anyhow::Context;
use collab_engine::auth::mint::ed25519_pem_pair;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [private_path, public_path] = args.as_slice() else {
        anyhow::bail!("usage: auth_keypair PRIVATE.pem PUBLIC.pem");
    };
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("reading /dev/urandom")?;
    let (private, public) = ed25519_pem_pair(&seed);
    std::fs::write(private_path, private).with_context(|| format!("writing {private_path}"))?;
    std::fs::write(public_path, public).with_context(|| format!("writing {public_path}"))?;
    Ok(())
}
