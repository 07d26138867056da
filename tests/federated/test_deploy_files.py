"""TLS material and SuperNode keys for a Flower deployment: valid, private, never overwritten."""

import ipaddress

import pytest

from privdiff.federated.deploy import create_node_key, create_tls_material


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts_and_keys_are_private(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    files = create_tls_material(folder=tmp_path, hosts=("superlink.example.org", "127.0.0.1"))
    ca = x509.load_pem_x509_certificate(files["ca"].read_bytes())
    server = x509.load_pem_x509_certificate(files["certificate"].read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert oct(files["key"].stat().st_mode)[-3:] == "600"
    node = create_node_key(folder=tmp_path, name="site-a")
    key = load_ssh_private_key(node["private"].read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert node["public"].read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct(node["private"].stat().st_mode)[-3:] == "600"


def test_nothing_is_overwritten_and_names_are_checked(tmp_path):
    create_node_key(folder=tmp_path, name="site-a")
    with pytest.raises(FileExistsError, match="does not overwrite"):
        create_node_key(folder=tmp_path, name="site-a")
    with pytest.raises(ValueError, match="plain file name"):
        create_node_key(folder=tmp_path, name="../escape")
