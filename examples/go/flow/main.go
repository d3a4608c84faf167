// Command flow calls referral-service from Go with the code that
// `buf generate --template buf.gen.go.yaml` writes to gen/go: register, a duplicate refused
// with its ErrorInfo reason, log in, create a referral code, look it up by email, register a
// referral with it, list the referrals.
//
//	go run ./examples/go/flow [host:port]   // default $REFERRAL_GRPC_TARGET or 127.0.0.1:50051
//
// The import path of the generated package is buf.gen.go.yaml's go_package_prefix.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"time"

	referralv1 "example.com/referral-service/gen/go/referral/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

const password = "correct horse battery staple"

// reason is the ErrorInfo reason of a failed call ("" when it carries none).
func reason(err error) string {
	for _, detail := range status.Convert(err).Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			return info.GetReason()
		}
	}
	return ""
}

// withToken sends the access token as `authorization: Bearer` metadata.
func withToken(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

func run(target string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Plaintext for a local server; use grpc.WithTransportCredentials(credentials.NewTLS(...)) otherwise.
	conn, err := grpc.DialContext(ctx, target, grpc.WithInsecure())
	if err != nil {
		return err
	}
	defer conn.Close()
	auth := referralv1.NewAuthServiceClient(conn)
	referrals := referralv1.NewReferralServiceClient(conn)

	suffix := make([]byte, 4)
	if _, err := rand.Read(suffix); err != nil {
		return err
	}
	alice := "alice-" + hex.EncodeToString(suffix) + "@example.com"
	bob := "bob-" + hex.EncodeToString(suffix) + "@example.com"

	registered, err := auth.Register(ctx, &referralv1.RegisterRequest{Email: alice, Password: password})
	if err != nil {
		return err
	}
	fmt.Println("registered:", registered.GetUser().GetEmail())

	_, err = auth.Register(ctx, &referralv1.RegisterRequest{Email: strings.ToUpper(alice), Password: password})
	if reason(err) != "EMAIL_ALREADY_REGISTERED" {
		return fmt.Errorf("duplicate registration: %v", err)
	}
	fmt.Println("duplicate refused:", status.Code(err), reason(err))

	tokens, err := auth.Login(ctx, &referralv1.LoginRequest{Email: alice, Password: password})
	if err != nil {
		return err
	}
	authed := withToken(ctx, tokens.GetAccessToken())
	me, err := auth.GetCurrentUser(authed, &referralv1.GetCurrentUserRequest{})
	if err != nil {
		return err
	}
	created, err := referrals.CreateReferralCode(authed, &referralv1.CreateReferralCodeRequest{
		Expiry:  &referralv1.CreateReferralCodeRequest_Ttl{Ttl: durationpb.New(7 * 24 * time.Hour)},
		MaxUses: 100,
	})
	if err != nil {
		return err
	}
	fmt.Println("created code:", created.GetReferralCode().GetCode())

	found, err := referrals.GetReferralCodeByEmail(ctx, &referralv1.GetReferralCodeByEmailRequest{Email: alice})
	if err != nil {
		return err
	}
	referred, err := auth.Register(ctx, &referralv1.RegisterRequest{
		Email: bob, Password: password, ReferralCode: found.GetReferralCode().GetCode(),
	})
	if err != nil {
		return err
	}
	if referred.GetUser().GetReferrerId() != me.GetUser().GetId() {
		return fmt.Errorf("bob is not alice's referral")
	}
	listed, err := referrals.ListReferrals(authed, &referralv1.ListReferralsRequest{
		ReferrerId: me.GetUser().GetId(), PageSize: 10,
	})
	if err != nil {
		return err
	}
	for _, referral := range listed.GetReferrals() {
		fmt.Println("referral:", referral.GetEmail())
	}
	fmt.Println("flow complete")
	return nil
}

func main() {
	target := os.Getenv("REFERRAL_GRPC_TARGET")
	if target == "" {
		target = "127.0.0.1:50051"
	}
	if len(os.Args) > 1 {
		target = os.Args[1]
	}
	if err := run(target); err != nil {
		fmt.Fprintln(os.Stderr, "flow failed:", err)
		os.Exit(1)
	}
}
