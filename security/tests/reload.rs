//! Certificates rotate without a restart: a reloading configuration picks up re-issued
//! files, keeps the last good one when the new files do not load, and a TLS handshake made
//! after the reload presents the new certificate.

use std::sync::Arc;

use ldc_security::Identity;
use ldc_security::net;
use ldc_security::pki::Pki;
use ldc_security::platform;
use ldc_security::tls::{self, ClientAuth, Reloading};

/// The serial number of the certificate a server presents to a fresh handshake.
async fn presented(
    listener: &tokio::net::TcpListener,
    server: &Arc<Reloading<rustls::ServerConfig>>,
    client: Arc<rustls::ClientConfig>,
) -> Vec<u8> {
    let addr = listener.local_addr().unwrap().to_string();
    let (accepted, connected) = tokio::join!(
        async {
            let (tcp, _) = listener.accept().await.unwrap();
            net::accept(tcp, server.current()).await
        },
        net::connect(&addr, client)
    );
    accepted.unwrap();
    let (tls, id) = connected.unwrap();
    assert_eq!(id, Some(Identity::Cell("c1".into())));
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_reissued_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    platform::ensure_local(&pki, ["c1"]).unwrap();
    let files = pki.files(&platform::cell_leaf("c1"));
    let registry = prometheus::Registry::new();
    let server = platform::server(files.clone(), ClientAuth::Required, &registry, "cell").unwrap();
    let client = Arc::new(
        tls::client_config(&tls::Credentials::load(&pki.files(platform::ROUTER)).unwrap()).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();

    let first = presented(&listener, &server, client.clone()).await;
    assert!(!server.reload_if_changed(), "nothing changed yet");

    // Rotation: a new certificate and key for the same cell (mtimes must move).
    std::thread::sleep(std::time::Duration::from_millis(20));
    let leaf = platform::local_leaves(["c1"])
        .into_iter()
        .find(|l| l.name == platform::cell_leaf("c1"))
        .unwrap();
    pki.issue(&leaf).unwrap();
    assert!(
        server.reload_if_changed(),
        "the new files were not picked up"
    );
    let second = presented(&listener, &server, client.clone()).await;
    assert_ne!(
        first, second,
        "the handshake still presents the old certificate"
    );

    // A broken file (a half-written rotation) keeps the last good configuration.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&files.cert, b"not a certificate").unwrap();
    assert!(!server.reload_if_changed());
    assert_eq!(presented(&listener, &server, client).await, second);

    let m = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        m.contains("ldc_tls_cert_expiry_timestamp_seconds{component=\"cell\"}"),
        "{m}"
    );
}
