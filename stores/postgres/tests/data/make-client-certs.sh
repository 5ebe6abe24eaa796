#!/bin/sh
# Regenerates the client-certificate test files: a CA, a server
# certificate for `localhost` (the stand-in's), and a client certificate
# with its key, plain and encrypted. Valid for 100 years. The keys are
# test keys, published here: never use them for anything else. Git keeps
# them readable by all, so the tests copy them to a file of mode 0600.
set -eu
days=36500
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
    -subj "/CN=Triage test client CA" -days $days -out client-ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout stand-in.key \
    -subj "/CN=localhost" -out stand-in.csr
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' > server.ext
openssl x509 -req -in stand-in.csr -CA client-ca.pem -CAkey ca.key -CAcreateserial -days $days \
    -extfile server.ext -out stand-in.pem
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout client.key \
    -subj "/CN=triage-tls-client" -out client.csr
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA client-ca.pem -CAkey ca.key -CAcreateserial -days $days \
    -extfile client.ext -out client.pem
openssl pkcs8 -topk8 -in client.key -passout pass:secret -out client-encrypted.key
rm -f ca.key client-ca.srl stand-in.csr client.csr server.ext client.ext
