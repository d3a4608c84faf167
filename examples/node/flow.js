#!/usr/bin/env node
// referral-service from Node.js: @grpc/grpc-js + @grpc/proto-loader on the .proto files
// themselves (no generated code). Runs the whole flow: register, log in, create a referral code,
// look it up by email, register a referral with it, list the referrals.
//
//   npm install                      # at the repository root (this folder is an npm workspace)
//   node examples/node/flow.js [host:port]     # default $REFERRAL_GRPC_TARGET or 127.0.0.1:50051
//
// Which RPCs need a token is read from the `(referral.v1.access)` option in the protos, the same
// truth the server's interceptor reads; errors are decoded from the google.rpc.Status details.
"use strict";

const path = require("node:path");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTOS = path.resolve(__dirname, "../../protos");
const INCLUDE_DIRS = [PROTOS, path.join(PROTOS, "third_party")];
const LOADER_OPTIONS = {
  keepCase: false, // lowerCamelCase field names, as in the protobuf JSON mapping
  longs: String, // int64 ids as strings: no precision loss
  enums: String,
  defaults: true,
  oneofs: false, // no virtual `_field` members for proto3 optional fields (synthetic oneofs)
  includeDirs: INCLUDE_DIRS,
};

const target = process.argv[2] || process.env.REFERRAL_GRPC_TARGET || "127.0.0.1:50051";
const definition = protoLoader.loadSync(
  ["referral/v1/auth.proto", "referral/v1/referral.proto"],
  LOADER_OPTIONS,
);
const api = grpc.loadPackageDefinition(definition).referral.v1;

// google.rpc.Status and its details, to read grpc-status-details-bin.
const statusRoot = new protobuf.Root();
statusRoot.resolvePath = (_origin, target) =>
  INCLUDE_DIRS.map((dir) => path.join(dir, target)).find((file) => require("node:fs").existsSync(file)) ||
  target;
statusRoot.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
statusRoot.resolveAll();
const Status = statusRoot.lookupType("google.rpc.Status");

/** The ErrorInfo reason, field violations and request id of a failed call. */
function richError(error) {
  const out = { code: grpc.status[error.code], message: error.details, reason: "", fields: {}, requestId: "" };
  const [raw] = error.metadata ? error.metadata.get("grpc-status-details-bin") : [];
  if (!raw) return out;
  for (const detail of Status.decode(raw).details) {
    const typeName = detail.type_url.split("/").pop();
    const message = statusRoot.lookupType(typeName).decode(detail.value);
    if (typeName === "google.rpc.ErrorInfo") out.reason = message.reason;
    if (typeName === "google.rpc.RequestInfo") out.requestId = message.requestId;
    if (typeName === "google.rpc.BadRequest") {
      for (const violation of message.fieldViolations) out.fields[violation.field] = violation.description;
    }
  }
  return out;
}

/** A promise-returning client whose calls attach the token only where the proto asks for one. */
function client(serviceName, credentials) {
  const Service = api[serviceName];
  const stub = new Service(target, credentials);
  const wrapped = {};
  for (const [name, method] of Object.entries(Service.service)) {
    const needsToken = method.options["(referral.v1.access)"] !== "ACCESS_PUBLIC";
    wrapped[method.originalName || name] = (request, token) =>
      new Promise((resolve, reject) => {
        const metadata = new grpc.Metadata();
        if (needsToken) {
          if (!token) return reject(new Error(`${serviceName}.${name} needs an access token`));
          metadata.set("authorization", `Bearer ${token}`);
        }
        const deadline = new Date(Date.now() + 10_000);
        stub[name](request, metadata, { deadline }, (error, response) => {
          if (error) {
            error.rich = richError(error);
            reject(error);
          } else {
            resolve(response);
          }
        });
      });
  }
  wrapped.close = () => stub.close();
  return wrapped;
}

function log(step, value) {
  console.log(`${step}: ${JSON.stringify(value)}`);
}

async function main() {
  const credentials = grpc.credentials.createInsecure();
  const auth = client("AuthService", credentials);
  const referrals = client("ReferralService", credentials);
  const suffix = crypto.randomBytes(4).toString("hex");
  const alice = `alice-${suffix}@example.com`;
  const bob = `bob-${suffix}@example.com`;
  const password = "correct horse battery staple";
  try {
    const registered = await auth.register({ email: alice, password });
    log("registered", registered.user);

    // The same email again: ALREADY_EXISTS with a machine-readable reason.
    try {
      await auth.register({ email: alice.toUpperCase(), password });
      throw new Error("a duplicate registration succeeded");
    } catch (error) {
      if (!error.rich) throw error;
      log("duplicate registration refused", error.rich);
      if (error.rich.reason !== "EMAIL_ALREADY_REGISTERED") throw error;
    }

    const tokens = await auth.login({ email: alice, password });
    log("logged in", { tokenType: tokens.tokenType, expiresIn: tokens.expiresIn });
    const access = tokens.accessToken;

    const me = await auth.getCurrentUser({}, access);
    log("current user", me.user);

    const created = await referrals.createReferralCode({ ttl: { seconds: 7 * 24 * 3600 }, maxUses: 100 }, access);
    log("created code", created.referralCode);

    const found = await referrals.getReferralCodeByEmail({ email: alice });
    log("looked up by email", found.referralCode);
    if (found.referralCode.code !== created.referralCode.code) throw new Error("lookup returned another code");

    const referral = await auth.register({ email: bob, password, referralCode: found.referralCode.code });
    log("registered referral", referral.user);
    if (referral.user.referrerId !== me.user.id) throw new Error("bob is not alice's referral");

    const listed = await referrals.listReferrals({ referrerId: me.user.id, pageSize: 10 }, access);
    log("referrals", listed);
    if (listed.referrals.length !== 1 || listed.referrals[0].email !== bob) {
      throw new Error("the referral list does not hold bob");
    }
    console.log("flow complete");
  } finally {
    auth.close();
    referrals.close();
  }
}

main().catch((error) => {
  console.error("flow failed:", error.rich || error);
  process.exit(1);
});
